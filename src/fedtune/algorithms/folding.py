"""Streaming aggregation: a round's updates folded into a running weighted sum as they arrive.

A strategy whose aggregate is a weighted sum of the updates (FedAvg and what builds on it) returns
a `Fold` from `Strategy.fold`; the server adds each accepted update to it and drops the update's
tensors, so it holds O(1) updates instead of one per client of the round. Its `aggregate_fit`
is the same fold over a list, so the streamed and the collected aggregate are one computation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from fedtune.algorithms.base import ClientUpdate, State


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The mean's dtype: float32, or float64 for float64 tensors."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class WeightedSum:
    """Σ w_i x_i and Σ w_i over the tensors added so far, named like `like`."""

    def __init__(self, like: State):
        # Sums run in float64: a few float32 (or half) terms add up to the same float64 value in
        # any order, up to rounding far below float32's, so the mean (rounded to acc_dtype) does
        # not depend on the order updates arrive in (a deployment's replies race) and a deployed
        # run ends with the simulation's adapter. The price: one float64 copy of the state.
        self.dtypes = {name: acc_dtype(t) for name, t in like.items()}
        self.sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in like.items()}
        self.total = 0.0
        self.count = 0

    def add(self, tensors: State, weight: float) -> None:
        for name, acc in self.sums.items():
            acc.add_(tensors[name].to(acc.dtype), alpha=weight)
        self.total += float(weight)
        self.count += 1

    def mean(self) -> State:
        """Σ w_i x_i / Σ w_i (ValueError with nothing added or weights not summing above 0)."""
        if self.count == 0:
            raise ValueError("a weighted mean needs at least one update")
        if self.total <= 0:
            raise ValueError("the weights must sum to a positive number")
        return {name: (acc / self.total).to(self.dtypes[name]) for name, acc in self.sums.items()}


class Fold(Protocol):
    """One round's aggregation, fed one accepted update at a time."""

    def add(self, update: ClientUpdate) -> None:
        """Fold in one update (its tensors may be dropped afterwards)."""
        ...

    def finish(self) -> State:
        """The new global state from everything added."""
        ...


def fold_all(fold: Fold, updates: Iterable[ClientUpdate]) -> State:
    """`fold` over a list: what aggregate_fit of a folding strategy is."""
    for update in updates:
        fold.add(update)
    return fold.finish()
