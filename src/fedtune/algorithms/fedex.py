"""FedEx (Khodak et al. 2021): client-side hyper-parameters by weight sharing within one run.

It wraps a base algorithm (FedAvg, FedAdam, ...; `federation.options.base`). Each round the server
draws every sampled client's local configuration from θ, a categorical distribution over the
grid's configurations (train.lr, train.local_steps, train.weight_decay, train.batch_size); only
its index travels down (with the grid's size and fingerprint). The client measures its validation
loss before and after training with it and sends both up as scalars beside its update; the server
checks them (a bad value rejects the reply, counted as any refused reply) and moves θ by
exponentiated gradient (algorithms/fedex_policy.py). θ is checkpointed with the base's state, and
logged each round (`fedex_theta`); summary.json's `strategy` holds the final θ and the chosen
configuration (argmax θ).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fedtune.algorithms import build_local, build_strategy
from fedtune.algorithms.base import (
    ClientUpdate,
    LocalContext,
    LocalOutcome,
    LocalProcedure,
    PersonalContext,
    State,
    Strategy,
    register,
)
from fedtune.algorithms.fedex_options import FedExConfig
from fedtune.algorithms.fedex_policy import Feedback, Policy, entropy
from fedtune.errors import MessageError
from fedtune.seeding import derive_seed

MAX_LOSS = 1e4         # a validation loss (nats per token) above it is refused, not folded into θ
PREFIX = "fedex/"      # FedEx's tensors in the strategy's checkpointed state
META = "fedex"         # the FIT message's meta entry: {"config", "configs", "grid"}
CONFIG, BEFORE, AFTER = "fedex_config", "fedex_val_before", "fedex_val_after"   # reply metrics


class FedEx:
    """The base strategy, with each client's configuration drawn from θ and θ moved by the replies."""

    def __init__(self, config: FedExConfig):
        self.config = config
        self.base: Strategy = build_strategy(config.base, config.base_options())
        self.configs = config.configurations()
        self.digest = config.digest()
        self.policy = Policy(len(self.configs), config.eta0(), config.schedule, config.discount,
                             config.entropy_cutoff)
        self.assigned: dict[str, int] = {}   # this round's draws, by client
        self.feedback_count = 0

    def configure_fit(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
        meta = self.base.configure_fit(round_, clients, lr)
        self.assigned = {c: self.policy.draw(derive_seed(self.config.seed, "fedex", round_, c))
                         for c in clients}
        for c in clients:
            meta[c] = {**meta[c], META: {"config": self.assigned[c], "configs": len(self.configs),
                                         "grid": self.digest}}
        return meta

    def fit_tensors(self, round_: int, global_state: State) -> State:
        return self.base.fit_tensors(round_, global_state)

    def update_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return self.base.update_specs(adapter)

    def feedback(self, update: ClientUpdate) -> Feedback | None:
        """The checked FedEx figures of one reply (MessageError: the reply is refused); None when
        the client had no validation examples to score its configuration on."""
        m, who = update.metrics, f"{update.client}'s reply"
        if update.client not in self.assigned:
            raise MessageError(f"{who}: FedEx drew no configuration for it this round")
        config = check_count(m.get(CONFIG), f"{who}: metrics.{CONFIG}", high=len(self.configs) - 1)
        if config != self.assigned[update.client]:
            raise MessageError(f"{who}: metrics.{CONFIG} is {config}, but the server drew "
                               f"configuration {self.assigned[update.client]} for it")
        if m.get(AFTER) is None and m.get(BEFORE) is None:
            return None
        after = check_loss(m.get(AFTER), f"{who}: metrics.{AFTER}")
        before = check_loss(m.get(BEFORE), f"{who}: metrics.{BEFORE}")
        loss = after - before if self.config.feedback == "difference" else after
        return Feedback(config, loss, float(update.n_examples))

    def fold(self, round_: int, global_state: State) -> FedExFold:
        return FedExFold(self, round_, global_state, self.base.fold(round_, global_state))

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        fold = self.fold(round_, global_state)
        for update in updates:
            fold.add(update)
        return fold.finish()

    def state_dict(self) -> State:
        return {**self.base.state_dict(), **self.policy.state_dict(PREFIX)}

    def load_state_dict(self, state: State) -> None:
        self.base.load_state_dict({k: v for k, v in state.items() if not k.startswith(PREFIX)})
        self.policy.load_state_dict(state, PREFIX)

    def round_metrics(self) -> dict[str, Any]:
        theta = self.policy.theta
        best = self.policy.best()
        return {**self.base.round_metrics(),
                "fedex_theta": [float(p) for p in theta], "fedex_entropy": entropy(theta),
                "fedex_eta": self.policy.last_eta, "fedex_baseline": self.policy.last_baseline,
                "fedex_feedback": self.feedback_count, "fedex_exploring": self.policy.exploring(),
                "fedex_best": best, "fedex_best_config": dict(self.configs[best])}

    def min_updates(self) -> int:
        return self.base.min_updates()


class FedExFold:
    """A round's aggregation: each reply's FedEx figures checked before the base folds it in (or,
    for a base that needs every update at once, keeps it); θ moves when the round aggregates."""

    def __init__(self, strategy: FedEx, round_: int, global_state: State, base_fold: Any):
        self.strategy, self.round, self.global_state = strategy, round_, global_state
        self.base_fold = base_fold
        self.kept: list[ClientUpdate] = []
        self.feedback: list[Feedback] = []

    def add(self, update: ClientUpdate) -> None:
        found = self.strategy.feedback(update)   # before anything is folded in
        if self.base_fold is not None:
            self.base_fold.add(update)
        else:   # the server drops update.tensors after add: keep our own reference
            self.kept.append(dataclasses.replace(update))
        if found is not None:
            self.feedback.append(found)

    def finish(self) -> State:
        s = self.strategy
        state = (self.base_fold.finish() if self.base_fold is not None
                 else s.base.aggregate_fit(self.round, self.global_state, self.kept))
        s.policy.update(self.feedback)
        s.feedback_count = len(self.feedback)
        return state


class FedExLocal:
    """The base's local procedure, run with the drawn configuration: its learning rate (scaled by
    the round's schedule), local steps, weight decay and batch size; validation loss before and after."""

    def __init__(self, config: FedExConfig):
        self.base: LocalProcedure = build_local(config.base, config.base_options())
        self.configs = config.configurations()
        self.digest = config.digest()

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return self.base.server_tensor_specs(adapter)

    def personal(self, ctx: PersonalContext) -> State | None:
        return self.base.personal(ctx)

    def drawn(self, meta: dict[str, Any]) -> int:
        """The configuration index the server sent, checked against this client's own grid."""
        entry = meta.get(META)
        if not isinstance(entry, dict):
            raise MessageError(f"fit message: meta.{META} must be an object with the drawn configuration")
        configs = check_count(entry.get("configs"), f"meta.{META}.configs", high=10**6)
        grid = check_text(entry.get("grid"), f"meta.{META}.grid")
        if configs != len(self.configs) or grid != self.digest:
            raise MessageError(f"meta.{META}: the server's FedEx grid ({configs} configurations, "
                               f"{grid}) is not this client's ({len(self.configs)}, {self.digest}); "
                               "both need the same federation.options.grid")
        return check_count(entry.get("config"), f"meta.{META}.config", high=len(self.configs) - 1)

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        j = self.drawn(ctx.meta)
        config = self.configs[j]
        trainer = ctx.trainer
        section = trainer.section
        lr = ctx.lr
        if "train.lr" in config:   # the round's schedule (warm-up, decay) applied to the drawn lr
            lr = float(config["train.lr"]) * (ctx.lr / section.lr)   # exactly the grid's at ratio 1
        changes: dict[str, Any] = {}
        if "train.local_steps" in config:
            changes.update(local_steps=int(config["train.local_steps"]), local_epochs=None)
        if "train.weight_decay" in config:
            changes["weight_decay"] = float(config["train.weight_decay"])
        if "train.batch_size" in config:
            changes["batch_size"] = int(config["train.batch_size"])
        before = _val_loss(ctx)
        trainer.section = section.model_copy(update=changes)
        try:
            outcome = self.base.fit(dataclasses.replace(ctx, lr=lr), global_state)
        finally:
            trainer.section = section
        after = _val_loss(ctx)
        outcome.metrics.update({"lr": lr, CONFIG: j})
        if before is not None and after is not None:
            outcome.metrics.update({BEFORE: before, AFTER: after})
        return outcome


def check_count(value: Any, what: str, *, high: int) -> int:
    """An int (not a bool) in [0, high], else MessageError."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise MessageError(f"{what} must be an integer in [0, {high}], got {_shown(value)}")
    return value


def check_loss(value: Any, what: str) -> float:
    """A finite loss in [0, MAX_LOSS], else MessageError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0.0 <= value <= MAX_LOSS:
        raise MessageError(f"{what} must be a finite loss in [0, {MAX_LOSS:g}], got {_shown(value)}")
    return float(value)


def check_text(value: Any, what: str) -> str:
    """A short printable string, else MessageError."""
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise MessageError(f"{what} must be a short printable text, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    if isinstance(value, int) and abs(value) > 10**30:   # repr() of a huge int may raise
        return "an integer beyond 1e30"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__} of {len(text)} characters"


def _val_loss(ctx: LocalContext) -> float | None:
    """The client's validation loss of the model now in its slot (None without validation data)."""
    if ctx.val_loss is None:
        return None
    found = ctx.val_loss()
    return float(found["loss"]) if "loss" in found else None


SPEC = register("fedex", FedEx, local=FedExLocal)
