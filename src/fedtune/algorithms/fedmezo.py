"""FedMeZO (arXiv 2402.05926): MeZO zeroth-order local training of the adapter, FedAvg on the server,
and a personalised learning rate per client, η_i = η0 + α·Φ_i.

Φ_i = (s_i − mean_j s_j) / max_j |s_j − mean_j s_j| ∈ [−1, 1] over the clients whose signal is
known (0 for the others and when all signals are equal); the signal s is the client's last train
loss (`loss`), the mean of its last five (`loss_mean5`), or ‖Δ_i − mean Δ‖ of its last update
(`update`). η0 is the round's `train.lr`. Any number of clients (the reference code assumed 3).
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.algorithms.base import (
    ClientUpdate,
    LocalContext,
    LocalOutcome,
    State,
    local_update,
    plain,
    plain_local,
    register,
)
from fedtune.algorithms.fedavg import client_weights, fedavg_aggregate
from fedtune.algorithms.options import FedMeZOConfig
from fedtune.data.prompts import collate
from fedtune.seeding import derive_seed
from fedtune.train.local import micro_batches, steps_for
from fedtune.train.zeroth_order import apply_zo_update, projected_gradient

HISTORY = 5


def personal_phi(signals: dict[str, float]) -> dict[str, float]:
    """Φ_i = (s_i − mean) / max |s_j − mean|; all zeros when the signals are equal."""
    if not signals:
        return {}
    mean = sum(signals.values()) / len(signals)
    spread = max(abs(s - mean) for s in signals.values())
    if spread == 0:
        return {c: 0.0 for c in signals}
    return {c: (s - mean) / spread for c, s in signals.items()}


@plain
class FedMeZO:
    def __init__(self, config: FedMeZOConfig):
        self.config = config
        self.history: dict[str, list[float]] = {}

    def _signal(self, client: str) -> float | None:
        values = self.history.get(client)
        if not values:
            return None
        if self.config.signal == "loss_mean5":
            return sum(values[-HISTORY:]) / len(values[-HISTORY:])
        return values[-1]

    def configure_fit(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
        known = {c: s for c in self.history if (s := self._signal(c)) is not None}
        phi = personal_phi(known)
        # Never a non-positive rate: a client far below the mean keeps a thousandth of η0.
        return {c: {"lr": max(lr + self.config.alpha * phi.get(c, 0.0), 1e-3 * lr)} for c in clients}

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        weights = client_weights(updates, self.config.weighting)
        new_state = fedavg_aggregate(global_state, [(u.tensors, w) for u, w in zip(updates, weights)])
        if self.config.signal == "update":
            mean = {k: new_state[k].float() - global_state[k].float() for k in global_state}
            for u in updates:
                dist = sum(float(((u.tensors[k].float() - mean[k]) ** 2).sum()) for k in mean) ** 0.5
                self._record(u.client, dist)
        else:
            for u in updates:
                loss = u.metrics.get("train_loss")
                if isinstance(loss, (int, float)) and loss == loss:
                    self._record(u.client, float(loss))
        return new_state

    def _record(self, client: str, value: float) -> None:
        self.history.setdefault(client, []).append(value)
        self.history[client] = self.history[client][-HISTORY:]

    def state_dict(self) -> State:
        return {f"signal/{c}": torch.tensor(v, dtype=torch.float64) for c, v in self.history.items()}

    def load_state_dict(self, state: State) -> None:
        self.history = {k.split("/", 1)[1]: v.tolist() for k, v in state.items()}


@plain_local
class MeZOLocal:
    """Local MeZO steps on the trainable tensors: two forward passes per step, no backward."""

    def __init__(self, config: FedMeZOConfig):
        self.config = config

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        import time

        start = time.perf_counter()
        trainer = ctx.trainer
        section = trainer.section
        names = list(ctx.slot.params)
        params = [ctx.slot.params[n] for n in names]
        decay = [not (n.endswith(".bias") or "norm" in n) for n in names]
        batches = micro_batches(len(ctx.train), section.batch_size, ctx.seed)
        n_steps = steps_for(section, len(ctx.train))
        losses, seen = [], 0
        trainer.model.eval()  # no dropout: both forward passes must see the same function
        for step in range(n_steps):
            indices = next(batches)  # the last batch of an epoch may be short
            seen += len(indices)
            batch = collate([ctx.train[i] for i in indices], trainer.pad_id)
            batch = {k: v.to(trainer.device) for k, v in batch.items()}
            seed = derive_seed(ctx.seed, "mezo", step)
            grad, loss = projected_gradient(trainer.model, params, batch, seed, self.config.eps)
            apply_zo_update(params, seed, grad, ctx.lr, section.weight_decay, decay)
            losses.append(loss)
        metrics = {"train_loss": sum(losses) / len(losses), "steps": n_steps,
                   "examples_seen": seen,
                   "train_seconds": time.perf_counter() - start}
        return LocalOutcome(update=local_update(ctx.slot.get(), global_state), metrics=metrics)


SPEC = register("fedmezo", lambda config: FedMeZO(config), local=MeZOLocal)
