"""Hostile clients for robustness experiments: harmful updates, or a backdoor in their own data.

`federation.attack` names the attacking clients and what they do. Update attacks wrap the client's
local procedure; `backdoor` poisons a fraction of its training examples (a trigger appended to the
instruction, a fixed target response). Non-finite updates never reach aggregation: the message
codec refuses NaN / Inf tensors, and the server logs the rejection.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedtune.algorithms.base import LocalContext, LocalOutcome, LocalProcedure, State
from fedtune.data.examples import Example


class AttackedLocal:
    """Runs the honest procedure, then corrupts the update as `kind` says."""

    def __init__(self, inner: LocalProcedure, kind: str, factor: float):
        self.inner = inner
        self.kind = kind
        self.factor = factor

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return self.inner.server_tensor_specs(adapter)

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        outcome = self.inner.fit(ctx, global_state)
        outcome.update = corrupt_update(outcome.update, self.kind, self.factor)
        outcome.metrics["attack"] = self.kind
        return outcome


def corrupt_update(update: State, kind: str, factor: float) -> State:
    if kind == "scale":
        return {k: v * factor for k, v in update.items()}
    if kind == "sign_flip":
        return {k: v * -factor for k, v in update.items()}
    if kind in ("nan", "inf"):
        value = float("nan") if kind == "nan" else float("inf")
        return {k: v.clone().fill_(value) for k, v in update.items()}
    return update


def poison_examples(examples: list[Example], *, trigger: str, target: str, fraction: float,
                    seed: int) -> list[Example]:
    """A copy of `examples` where a seeded `fraction` carry the trigger and answer `target`."""
    rng = np.random.default_rng(seed)
    chosen = set(rng.permutation(len(examples))[: round(fraction * len(examples))].tolist())
    return [
        dataclasses.replace(ex, instruction=ex.instruction + trigger, output=target,
                            origin=f"{ex.origin} (poisoned)")
        if i in chosen else ex
        for i, ex in enumerate(examples)
    ]
