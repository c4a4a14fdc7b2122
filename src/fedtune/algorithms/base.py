"""What every federated algorithm provides: a config, a strategy object, pure aggregation math."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel

from fedtune.algorithms.catalog import CATALOG
from fedtune.algorithms.party import Party, standard_party

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What a client sent back after local training: `tensors` are its update (local - global)."""

    client: str
    tensors: State
    n_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    """Server-side logic of an algorithm. Holds only its own state (e.g. server optimizer moments).

    Every method is one the Server calls; a strategy implements all of them (no base class: the
    common bodies are one line each, with `same_lr` and `refuse_state` below)."""

    def configure_fit(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
        """Per-client instructions (message meta) for a round's local training."""
        ...

    def fit_tensors(self, round_: int, global_state: State) -> State:
        """Extra tensors sent with the global adapter (names must not clash with it); often {}."""
        ...

    def update_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        """Specs of the extra tensors a client's update carries besides the adapter delta; often {}."""
        ...

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        """The new global state from the clients' updates."""
        ...

    def fold(self, round_: int, global_state: State) -> Any:
        """A `Fold` (algorithms/folding.py) that streams this round's updates into the aggregate
        as they arrive, where the aggregate is a weighted sum; None when aggregate_fit needs every
        update at once (median, Krum, ...), so the server collects them."""
        ...

    def state_dict(self) -> State:
        """Tensors to checkpoint so a resumed run continues exactly."""
        ...

    def load_state_dict(self, state: State) -> None: ...

    def round_metrics(self) -> dict[str, Any]:
        """Figures of the last aggregation worth logging (e.g. the privacy spent so far); often {}."""
        ...

    def min_updates(self) -> int:
        """The fewest valid updates aggregate_fit can use; with fewer, the round leaves the global
        state unchanged (as with too few replies) instead of failing the run."""
        ...


def same_lr(clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
    """The common instructions: every client trains at the round's learning rate."""
    return {c: {"lr": lr} for c in clients}


def refuse_state(strategy: object, state: State) -> None:
    """load_state_dict of a strategy that keeps no state: only an empty one fits."""
    if state:
        raise ValueError(f"{type(strategy).__name__} keeps no state, got {sorted(state)[:3]}")


def _same_lr_for_all(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
    return same_lr(clients, lr)


def _no_tensors(self, round_: int, global_state: State) -> State:
    return {}


def _no_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
    return {}


def _no_state(self) -> State:
    return {}


def _refuse_state(self, state: State) -> None:
    refuse_state(self, state)


def _no_metrics(self) -> dict[str, Any]:
    return {}


def _one_update(self) -> int:
    return 1


def _no_fold(self, round_: int, global_state: State) -> None:
    return None


PLAIN_BODIES = {
    "configure_fit": _same_lr_for_all,   # every client trains at the round's learning rate
    "fit_tensors": _no_tensors,          # nothing sent beside the global model
    "update_specs": _no_specs,           # updates shaped like the adapter only
    "state_dict": _no_state,             # no server state to checkpoint ...
    "load_state_dict": _refuse_state,    # ... so only an empty one restores
    "round_metrics": _no_metrics,
    "min_updates": _one_update,
    "fold": _no_fold,                    # aggregate_fit sees every update at once
}


def plain(cls: type) -> type:
    """Class decorator: give a strategy the plain body of each Strategy method it does not write.

    Composition, not inheritance: the bodies are set on the class itself (its `vars` hold the
    whole Protocol and it inherits from `object` only), and a class overrides one by defining it.
    """
    for name, body in PLAIN_BODIES.items():
        if name not in vars(cls):
            setattr(cls, name, body)
    return cls


@dataclass
class LocalContext:
    """What a client's local procedure works with in one round."""

    client: str
    round: int
    seed: int                 # derived from (recipe seed, "fit", round, client)
    lr: float
    slot: Any                 # AdapterSlot: the trainable tensors of the (shared) model
    trainer: Any              # LocalTrainer
    train: list               # the client's tokenized training examples
    state: State              # the client's persistent algorithm state (e.g. control variates)
    server_tensors: State     # extra tensors the strategy broadcast this round (e.g. SCAFFOLD's c)
    meta: dict[str, Any]      # the round's instructions from the server


@dataclass
class PersonalContext:
    """What a client's personal model is made from at an evaluation: its persistent state, and
    the global model just loaded into the slot (an FT procedure may train it: the client reloads
    the global model before anything else uses the slot)."""

    client: str
    round: int
    seed: int                 # derived from (recipe seed, "personal", round, client)
    slot: Any                 # AdapterSlot: the shared model, holding the global model now
    trainer: Any              # LocalTrainer
    train: list               # the client's tokenized training examples
    state: State              # the client's persistent algorithm state
    global_state: State       # the global state just loaded (the view's form)


@dataclass
class LocalOutcome:
    update: State                                    # local − global, for the adapter tensors
    extra: State = field(default_factory=dict)       # further tensors to send (e.g. Δc)
    metrics: dict[str, Any] = field(default_factory=dict)


class LocalProcedure(Protocol):
    """Client-side part of an algorithm: turn the global adapter (already loaded) into an update."""

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        """Specs of the extra tensors expected with the global adapter (see Strategy.fit_tensors)."""
        ...

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome: ...

    def personal(self, ctx: PersonalContext) -> State | None:
        """The client's own model (personalised FL): the model's trainable tensors, by parameter
        name, that it holds in place of the global model's (all of them, some, or {} for the
        global model itself), from its persistent `ctx.state` or adapted from the global model now
        in the slot (FT). The client overlays them on the global model and evaluates the result on
        its test part beside the global one, as `personal_<metric>`. None: there is none."""
        ...


def _no_server_tensors(self: Any, adapter: dict[str, Any]) -> dict[str, Any]:
    return {}


def _no_personal(self: Any, ctx: PersonalContext) -> State | None:
    return None


PLAIN_LOCAL_BODIES = {
    "server_tensor_specs": _no_server_tensors,   # nothing expected beside the global adapter
    "personal": _no_personal,                    # no personal model: the global one is evaluated
}


def plain_local(cls: type) -> type:
    """Class decorator: give a local procedure the plain body of each LocalProcedure method it
    does not write (as `plain` does for strategies; set on the class itself, not inherited)."""
    for name, body in PLAIN_LOCAL_BODIES.items():
        if name not in vars(cls):
            setattr(cls, name, body)
    return cls


@plain_local
class StandardLocal:
    """Plain local training (FedAvg and every server-side-only algorithm)."""

    batchable = True   # see batchable() below

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed)
        return LocalOutcome(update=local_update(ctx.slot.get(), global_state), metrics=result_metrics(result))


def batchable(local: LocalProcedure) -> bool:
    """Whether several clients' `fit` of this procedure may train together (runtime/batched.py):
    its class says `batchable = True` when its fit calls ctx.trainer.train once and touches the
    model only through ctx.slot (`params`, `get`, `set`), its hooks acting on `ctx.slot.params`.
    Read from the class itself, so a wrapper (an attack) is not batchable unless it says so."""
    return bool(type(local).__dict__.get("batchable", False))


def local_update(local: State, global_state: State) -> State:
    return {k: local[k] - global_state[k].to(local[k].dtype) for k in local}


def result_metrics(result) -> dict[str, Any]:
    metrics = {"train_loss": result.loss, "steps": result.steps, "examples_seen": result.examples,
               "train_seconds": result.seconds}
    dp = getattr(result, "dp", None)
    if dp is not None:  # DP-SGD: the client adds its (ε, δ) so far (train/dp_sgd.py)
        metrics.update(dp_steps=dp.steps, dp_sample_rate=dp.sample_rate,
                       dp_noise_multiplier=dp.noise_multiplier)
    return metrics


def _standard_local(config: BaseModel) -> LocalProcedure:
    return StandardLocal()


class ModelView:
    """What the global model is on the wire, and how it becomes the model's trainable tensors.

    For most algorithms the global state IS the adapter: `initial` reads it from the model and
    `load` copies it in. An algorithm whose global model travels in another form (FedKSeed: one
    scalar per candidate seed) provides its own view; every party (server, each client) builds one
    per process from the same recipe, right after the model, before any training.
    """

    def __init__(self, slot: Any):
        self.slot = slot

    def initial(self) -> State:
        """The global state before round 1."""
        return self.slot.get()

    def load(self, state: State) -> None:
        """Make the model's trainable tensors those of the global state `state`."""
        self.slot.set(state)


def _adapter_view(config: BaseModel, slot: Any) -> ModelView:
    return ModelView(slot)


@dataclass(frozen=True)
class AlgorithmSpec:
    """A catalogued algorithm (name, summary, options, checks: `catalog.py`) with its implementation."""

    name: str
    summary: str
    config: type[BaseModel]
    build: Callable[..., Strategy]   # (options), or (options, number of clients) with needs_clients
    local: Callable[[BaseModel], LocalProcedure] = _standard_local
    view: Callable[[BaseModel, Any], ModelView] = _adapter_view   # (options, AdapterSlot)
    check: Callable[[BaseModel, Any], None] | None = None           # (options, Recipe)
    sum_only: bool = False        # see catalog.AlgorithmInfo
    party: Callable[[BaseModel, Any], Party] = standard_party       # (options, Recipe): party.py
    needs_clients: bool = False   # the strategy is built for a federation of a known size


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(name: str, build: Callable[..., Strategy], *, needs_clients: bool = False,
             local: Callable[[BaseModel], LocalProcedure] = _standard_local,
             view: Callable[[BaseModel, Any], ModelView] = _adapter_view,
             party: Callable[[BaseModel, Any], Party] = standard_party) -> AlgorithmSpec:
    """Register the implementation of the catalogued algorithm `name` (from its own module)."""
    info = CATALOG.get(name)
    if info is None:
        raise ValueError(f"algorithm {name!r} is not in fedtune.algorithms.catalog; add a row there")
    if name in _REGISTRY:
        raise ValueError(f"algorithm {name!r} is registered twice")
    spec = AlgorithmSpec(name=name, summary=info.summary, config=info.config, build=build,
                         local=local, view=view, check=info.check, sum_only=info.sum_only,
                         party=party, needs_clients=needs_clients)
    _REGISTRY[name] = spec
    return spec


def registry() -> dict[str, AlgorithmSpec]:
    """Every catalogued algorithm with its implementation (importing their modules on first use)."""
    for info in CATALOG.values():
        if info.name not in _REGISTRY:
            importlib.import_module(f"fedtune.algorithms.{info.module}")
            if info.name not in _REGISTRY:
                raise RuntimeError(f"fedtune.algorithms.{info.module} does not register {info.name!r}")
    return dict(_REGISTRY)
