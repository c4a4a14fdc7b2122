"""FFA-LoRA (Sun et al. 2024): LoRA's A matrices stay frozen at their random initial values and
only the B matrices train and travel (half the bytes). Aggregation is then exact:
mean(B_k)·A = mean(B_k·A). Every party must hold the same A: fedtune draws the adapter's initial
values from the recipe seed on every party, and the view resets A to them whenever the global
state is loaded. Not personalised: every client uses the global model."""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    State,
    plain_local,
    register,
    result_metrics,
)
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.personal import PartialView, check_split, matching, shared_update

LORA_A = ["lora_A"]


def frozen_a_view(config: Any, slot: Any) -> PartialView:
    """The wire carries B only; A is frozen (requires_grad off) at its seeded initial values."""
    frozen = matching(list(slot.params), LORA_A)
    check_split(frozen, list(slot.params), "adapter (ffa_lora: LoRA A tensors)")
    for name in frozen:
        slot.params[name].requires_grad_(False)
    return PartialView(slot, frozen)


@plain_local
class FrozenALocal:
    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed)
        return LocalOutcome(update=shared_update(ctx.slot.get(), global_state),
                            metrics=result_metrics(result))


SPEC = register("ffa_lora", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
                local=lambda config: FrozenALocal(), view=frozen_a_view)
