"""Byzantine-robust aggregation: coordinate median, trimmed mean, (multi-)Krum, norm bounding.

Each rule is a pure function from the client updates (local − global) to one aggregated
update, which the strategy adds to the global state. Median, trimmed mean and Krum ignore
the clients' example counts by default: a Byzantine client can lie about its count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.fedavg import client_weights
from fedtune.algorithms.options import (
    KrumConfig,
    MedianConfig,
    NormBoundingConfig,
    TrimmedMeanConfig,
)
from fedtune.errors import RecipeError


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sorted_stack(updates: Sequence[State], name: str) -> torch.Tensor:
    """The clients' values of tensor `name`, sorted per coordinate along a new first axis."""
    like = updates[0][name]
    return torch.stack([u[name].to(_acc_dtype(like)) for u in updates]).sort(dim=0).values


def _weighted_mean(updates: Sequence[State], weights: Sequence[float]) -> State:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights must sum to a positive number")
    out: State = {}
    for name, like in updates[0].items():
        acc = torch.zeros(like.shape, dtype=_acc_dtype(like))
        for u, w in zip(updates, weights):
            acc.add_(u[name].to(acc.dtype), alpha=w / total)
        out[name] = acc.to(like.dtype)
    return out


def _need(updates: Sequence[Any], rule: str) -> None:
    if not updates:
        raise ValueError(f"{rule} needs at least one update")


def median_aggregate(updates: Sequence[State]) -> State:
    """Coordinate-wise median; for an even count, the mean of the two middle values."""
    _need(updates, "median_aggregate")
    n = len(updates)
    out: State = {}
    for name, like in updates[0].items():
        s = _sorted_stack(updates, name)
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        out[name] = mid.to(like.dtype)
    return out


def trimmed_mean_aggregate(updates: Sequence[State], *, trim_ratio: float) -> State:
    """Per coordinate, drop the ⌊β·n⌋ largest and ⌊β·n⌋ smallest values and average the rest."""
    _need(updates, "trimmed_mean_aggregate")
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    n = len(updates)
    k = int(trim_ratio * n + 1e-9)  # ⌊β·n⌋, safe from 0.29 * 100 == 28.999…
    return {name: _sorted_stack(updates, name)[k:n - k].mean(dim=0).to(like.dtype)
            for name, like in updates[0].items()}


def krum_scores(updates: Sequence[State], *, byzantine: int) -> torch.Tensor:
    """score(i) = Σ of squared L2 distances from update i to its n − f − 2 nearest other updates.

    Distances are over the concatenation of all tensors, accumulated in float64.
    """
    n = len(updates)
    if n <= 2 * byzantine + 2:
        raise ValueError(f"krum needs more than 2*byzantine + 2 = {2 * byzantine + 2} updates, "
                         f"got {n} (byzantine={byzantine})")
    dist = torch.zeros(n, n, dtype=torch.float64)
    for name in updates[0]:
        x = torch.stack([u[name].reshape(-1).to(torch.float64) for u in updates])
        dist += torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    dist.fill_diagonal_(float("inf"))  # never one's own neighbour
    return dist.sort(dim=1).values[:, : n - byzantine - 2].sum(dim=1)


def krum_aggregate(
    updates: Sequence[tuple[State, float]], *, byzantine: int, multi: int = 1
) -> State:
    """Krum (multi=1): the update with the lowest score; multi-Krum: the weighted mean of the
    `multi` lowest-scoring updates (ties go to the earlier client). Blanchard et al. 2017."""
    _need(updates, "krum_aggregate")
    scores = krum_scores([u for u, _ in updates], byzantine=byzantine)
    n = len(updates)
    if not 1 <= multi <= n - byzantine:
        raise ValueError(f"krum: multi must be between 1 and n − byzantine = {n - byzantine}, got {multi}")
    chosen = torch.argsort(scores, stable=True)[:multi].tolist()
    return _weighted_mean([updates[i][0] for i in chosen], [updates[i][1] for i in chosen])


def update_norm(update: State) -> float:
    """The L2 norm of an update over all its tensors together."""
    return float(sum(t.to(torch.float64).square().sum() for t in update.values())) ** 0.5


def norm_bounding_aggregate(updates: Sequence[tuple[State, float]], *, max_norm: float) -> State:
    """Scale each update by min(1, M / ‖Δ_i‖), then take the weighted mean (Sun et al. 2019).

    Any weighted mean of updates with norm ≤ M has norm ≤ M, so a client lying about its
    example count still cannot move the global state by more than M.
    """
    _need(updates, "norm_bounding_aggregate")
    clipped = []
    for update, _ in updates:
        norm = update_norm(update)
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped.append({n: (t.to(_acc_dtype(t)) * scale) for n, t in update.items()})
    out = _weighted_mean(clipped, [w for _, w in updates])
    return {n: out[n].to(t.dtype) for n, t in updates[0][0].items()}


def apply_update(global_state: State, update: State) -> State:
    """global + update, added in float32 (float64 for float64) and cast back to each dtype."""
    out: State = {}
    for name, g in global_state.items():
        acc = _acc_dtype(g)
        out[name] = (g.to(acc) + update[name].to(acc)).to(g.dtype)
    return out


@plain
class RobustAggregation:
    """Strategy for one robust rule: new global = global + rule(updates); keeps no state."""

    def __init__(self, config: BaseModel, rule: Callable[[list[ClientUpdate]], State],
                 min_updates: int = 1):
        self.config = config
        self._rule = rule
        self._min_updates = min_updates

    def min_updates(self) -> int:
        return self._min_updates

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return apply_update(global_state, self._rule(updates))


def _build_median(c: MedianConfig) -> RobustAggregation:
    return RobustAggregation(c, lambda ups: median_aggregate([u.tensors for u in ups]))


def _build_trimmed_mean(c: TrimmedMeanConfig) -> RobustAggregation:
    return RobustAggregation(
        c, lambda ups: trimmed_mean_aggregate([u.tensors for u in ups], trim_ratio=c.trim_ratio))


def _build_krum(c: KrumConfig) -> RobustAggregation:
    def rule(ups: list[ClientUpdate]) -> State:
        n = len(ups)
        if n <= 2 * c.byzantine + 2:
            raise RecipeError(
                f"federation.options.byzantine: krum with byzantine={c.byzantine} needs more than "
                f"{2 * c.byzantine + 2} client updates per round, got {n}; lower it or sample more clients")
        if c.multi > n - c.byzantine:
            raise RecipeError(
                f"federation.options.multi: multi-Krum can average at most n − byzantine = "
                f"{n - c.byzantine} updates this round, got multi={c.multi}")
        weights = client_weights(ups, c.weighting)
        return krum_aggregate([(u.tensors, w) for u, w in zip(ups, weights)],
                              byzantine=c.byzantine, multi=c.multi)

    # A round where rejected or missing clients leave fewer is skipped by the server, not fatal.
    return RobustAggregation(c, rule, min_updates=max(2 * c.byzantine + 3, c.multi + c.byzantine))


def _build_norm_bounding(c: NormBoundingConfig) -> RobustAggregation:
    def rule(ups: list[ClientUpdate]) -> State:
        weights = client_weights(ups, c.weighting)
        return norm_bounding_aggregate([(u.tensors, w) for u, w in zip(ups, weights)],
                                       max_norm=c.max_norm)

    return RobustAggregation(c, rule)


MEDIAN = register("median", _build_median)
TRIMMED_MEAN = register("trimmed_mean", _build_trimmed_mean)
KRUM = register("krum", _build_krum)
NORM_BOUNDING = register("norm_bounding", _build_norm_bounding)
