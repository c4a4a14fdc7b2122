"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each client's drift.

Client i corrects every gradient by (c − c_i); after K local steps at rate η it updates its
control variate with the paper's option II, c_i⁺ = c_i − c + (x − y_i)/(K·η), and sends
Δy_i = y_i − x and Δc_i = c_i⁺ − c_i. The server applies x ← x + η_g·mean(Δy) and
c ← c + Σ_{i∈S} Δc_i / N. Defined for SGD; with AdamW the correction still applies to the
gradient, but option II's step-size estimate is then only approximate.
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
    plain_local,
    register,
    result_metrics,
    same_lr,
)
from fedtune.algorithms.fedavg import client_weights, fedavg_aggregate
from fedtune.algorithms.options import ScaffoldConfig

C, DC, CI = "scaffold/c/", "scaffold/dc/", "scaffold/ci/"


def scaffold_aggregate(global_state: State, c: State, updates: list[tuple[State, State, float]],
                       *, global_lr: float, n_clients: int) -> tuple[State, State]:
    """(x, c) ← (x + η_g·Σw_iΔy_i/Σw_i, c + ΣΔc_i/N) for updates (Δy_i, Δc_i, w_i)."""
    mean = fedavg_aggregate({k: torch.zeros_like(v) for k, v in global_state.items()},
                            [(dy, w) for dy, _, w in updates])
    new_x = {k: (v.float() + global_lr * mean[k].float()).to(v.dtype) for k, v in global_state.items()}
    new_c = {k: v + sum(dc[k].float() for _, dc, _ in updates) / n_clients for k, v in c.items()}
    return new_x, new_c


class Scaffold:
    def __init__(self, config: ScaffoldConfig, n_clients: int):
        self.config = config
        self.n_clients = n_clients
        self.c: State = {}

    def fit_tensors(self, round_: int, global_state: State) -> State:
        if not self.c:
            self.c = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in global_state.items()}
        return {C + k: v for k, v in self.c.items()}

    def update_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return {DC + k: spec for k, spec in _float32(adapter).items()}

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        weights = client_weights(updates, self.config.weighting)
        split = [({k: u.tensors[k] for k in global_state},
                  {k: u.tensors[DC + k] for k in global_state}, w) for u, w in zip(updates, weights)]
        new_x, self.c = scaffold_aggregate(global_state, self.c, split,
                                           global_lr=self.config.global_lr, n_clients=self.n_clients)
        return new_x

    def state_dict(self) -> State:
        return {C + k: v for k, v in self.c.items()}

    def load_state_dict(self, state: State) -> None:
        self.c = {k[len(C):]: v for k, v in state.items() if k.startswith(C)}

    def configure_fit(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
        return same_lr(clients, lr)

    def round_metrics(self) -> dict[str, Any]:
        return {}

    def min_updates(self) -> int:
        return 1

    def fold(self, round_: int, global_state: State) -> None:
        return None  # the server collects the round's updates (each carries its Δc as well)


def _float32(specs: dict[str, Any]) -> dict[str, Any]:
    from fedtune.wire import TensorSpec

    return {k: TensorSpec(tuple(s.shape), torch.float32) for k, s in specs.items()}


@plain_local
class ScaffoldLocal:
    batchable = True   # base.batchable(): trains through ctx.trainer.train on ctx.slot.params only
    def __init__(self, config: ScaffoldConfig):
        self.config = config

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return {C + k: spec for k, spec in _float32(adapter).items()}

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        params = ctx.slot.params
        c = {k: ctx.server_tensors[C + k] for k in global_state}
        ci = {k: ctx.state.get(CI + k, torch.zeros_like(c[k])) for k in global_state}
        correction = {k: (c[k] - ci[k]).to(p.device, p.dtype) for k, p in params.items()}

        def correct() -> None:
            for k, p in params.items():
                if p.grad is not None:
                    p.grad.add_(correction[k])

        result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed, before_step=correct)
        delta = local_update(ctx.slot.get(), global_state)
        scale = 1.0 / (result.steps * ctx.lr)
        dc = {}
        for k in global_state:
            new_ci = ci[k] - c[k] - delta[k].float() * scale
            dc[DC + k] = new_ci - ci[k]
            ctx.state[CI + k] = new_ci
        return LocalOutcome(update=delta, extra=dc, metrics=result_metrics(result))


SPEC = register("scaffold", Scaffold, local=ScaffoldLocal, needs_clients=True)
