"""FedAvg: the new global adapter is the example-weighted mean of the clients' local adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.options import FedAvgConfig


def fedavg_aggregate(global_state: State, updates: Sequence[tuple[State, float]]) -> State:
    """global + Σ w_i Δ_i / Σ w_i, where Δ_i = local_i − global (so equal to the mean of locals).

    Accumulates in float32 (or float64 for float64 tensors) and casts back to each tensor's dtype.
    """
    if not updates:
        raise ValueError("fedavg_aggregate needs at least one update")
    total = float(sum(w for _, w in updates))
    if total <= 0:
        raise ValueError("fedavg_aggregate: the weights must sum to a positive number")
    out: State = {}
    for name, g in global_state.items():
        acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        acc = torch.zeros(g.shape, dtype=acc_dtype)
        for delta, w in updates:
            acc.add_(delta[name].to(acc_dtype), alpha=w / total)
        out[name] = (g.to(acc_dtype) + acc).to(g.dtype)
    return out


def client_weights(updates: Sequence[ClientUpdate], weighting: str) -> list[float]:
    if weighting == "uniform":
        return [1.0] * len(updates)
    return [float(u.n_examples) for u in updates]


@plain
class FedAvg:
    def __init__(self, config: FedAvgConfig):
        self.config = config

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        weights = client_weights(updates, self.config.weighting)
        return fedavg_aggregate(global_state, [(u.tensors, w) for u, w in zip(updates, weights)])


SPEC = register("fedavg", lambda config: FedAvg(config))
