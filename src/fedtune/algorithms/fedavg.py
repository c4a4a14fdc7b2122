"""FedAvg: the new global adapter is the example-weighted mean of the clients' local adapters."""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.folding import WeightedSum, fold_all
from fedtune.algorithms.options import FedAvgConfig


def fedavg_aggregate(global_state: State, updates: Sequence[tuple[State, float]]) -> State:
    """global + Σ w_i Δ_i / Σ w_i, where Δ_i = local_i − global (so equal to the mean of locals).

    Accumulates in float32 (or float64 for float64 tensors) and casts back to each tensor's dtype;
    the same arithmetic as the streamed FedAvgFold.
    """
    if not updates:
        raise ValueError("fedavg_aggregate needs at least one update")
    running = WeightedSum(global_state)
    for delta, w in updates:
        running.add(delta, w)
    try:
        return apply_mean(global_state, running.mean())
    except ValueError as exc:
        raise ValueError(f"fedavg_aggregate: {exc}") from None


def apply_mean(global_state: State, mean: State) -> State:
    """global + mean, in the mean's precision, cast back to each tensor's dtype."""
    return {name: (g.to(mean[name].dtype) + mean[name]).to(g.dtype) for name, g in global_state.items()}


def update_weight(update: ClientUpdate, weighting: str) -> float:
    """An update's weight: 1 under `uniform`, otherwise its (checked) example count."""
    return 1.0 if weighting == "uniform" else float(update.n_examples)


class FedAvgFold:
    """FedAvg streamed: the running Σ w_i Δ_i; global + their weighted mean at the end."""

    def __init__(self, global_state: State, weighting: str):
        self.global_state, self.weighting = global_state, weighting
        self.running = WeightedSum(global_state)

    def add(self, update: ClientUpdate) -> None:
        self.running.add(update.tensors, update_weight(update, self.weighting))

    def finish(self) -> State:
        return apply_mean(self.global_state, self.running.mean())


def client_weights(updates: Sequence[ClientUpdate], weighting: str) -> list[float]:
    return [update_weight(u, weighting) for u in updates]


@plain
class FedAvg:
    def __init__(self, config: FedAvgConfig):
        self.config = config

    def fold(self, round_: int, global_state: State) -> FedAvgFold:
        return FedAvgFold(global_state, self.config.weighting)

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            raise ValueError("fedavg_aggregate needs at least one update")
        return fold_all(self.fold(round_, global_state), updates)


SPEC = register("fedavg", lambda config: FedAvg(config))
