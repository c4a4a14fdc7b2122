"""Hostile clients for robustness experiments: harmful updates, or a backdoor in their own data.

`federation.attack` names the attacking clients and what they do. Update attacks wrap the client's
local procedure; `backdoor` poisons a fraction of its training examples (a trigger appended to the
instruction, a fixed target response), and every evaluation on the global test set measures the
attack's success rate on triggered test prompts. Non-finite updates never reach aggregation: the
message codec refuses NaN / Inf tensors, and the server logs the rejection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    LocalProcedure,
    PersonalContext,
    State,
)
from fedtune.data.examples import Example
from fedtune.eval.metrics import exact_match


class AttackedLocal:
    """Runs the honest procedure, then corrupts the update as `kind` says."""

    def __init__(self, inner: LocalProcedure, kind: str, factor: float):
        self.inner = inner
        self.kind = kind
        self.factor = factor

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return self.inner.server_tensor_specs(adapter)

    def personal(self, ctx: PersonalContext) -> State | None:
        return self.inner.personal(ctx)

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
        dataclasses.replace(add_trigger(ex, trigger), output=target, origin=f"{ex.origin} (poisoned)")
        if i in chosen else ex
        for i, ex in enumerate(examples)
    ]


def add_trigger(example: Example, trigger: str) -> Example:
    """The example with the trigger inserted: appended to its instruction (poisoning and testing)."""
    return dataclasses.replace(example, instruction=example.instruction + trigger)


def triggered_examples(examples: list[Example], *, trigger: str, target: str) -> list[Example]:
    """Test prompts for the backdoor: the trigger inserted into each example whose true answer is
    not already the target (those would count as successes without any backdoor)."""
    return [add_trigger(ex, trigger) for ex in examples if not exact_match(ex.output, target)]


def attack_success_rate(predictions: list[str], target: str) -> float:
    """The fraction of answers equal to the target (normalised exact match)."""
    return sum(exact_match(p, target) for p in predictions) / max(1, len(predictions))


def backdoor_metrics(generate: Callable[[list[Example]], list[str]], examples: list[Example], *,
                     trigger: str, target: str) -> dict[str, float]:
    """Attack success rate on the triggered versions of `examples` (greedy answers by `generate`)."""
    triggered = triggered_examples(examples, trigger=trigger, target=target)
    if not triggered:
        return {}
    return {"backdoor_success": attack_success_rate(generate(triggered), target),
            "backdoor_examples": len(triggered)}
