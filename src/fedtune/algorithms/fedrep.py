"""FedRep-style partial sharing (Collins et al. 2021) on the adapter: a shared part travels and is
averaged, a personal part stays with each client. The client first trains its personal part with
the shared part frozen (τ_h = `personal_steps`), then the shared part with its personal part frozen
(the recipe's local budget), and sends the shared part's update only. The personal part is, by
default, the adapter tensors of the top layer (`top_layers`), or the tensors named by `personal`
(substrings, e.g. ["lora_B"]). Its initial values are the adapter's (the same for every client);
each client's own values live in its persistent state, never in the shared model between turns."""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    PersonalContext,
    State,
    plain_local,
    register,
    result_metrics,
)
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.options import FedRepConfig
from fedtune.algorithms.personal import (
    PartialView,
    check_split,
    keep_personal,
    matching,
    personal_part,
    shared_update,
    top_layer_names,
    trainable_only,
)
from fedtune.seeding import derive_seed


def fedrep_personal(config: FedRepConfig, names: list[str]) -> set[str]:
    """The personal tensors: those `personal` names, else the top `top_layers` layers'."""
    if config.personal:
        chosen = matching(names, config.personal)
        check_split(chosen, names, "federation.options.personal")
    else:
        chosen = top_layer_names(names, config.top_layers)
        check_split(chosen, names, "federation.options.top_layers")
    return chosen


@plain_local
class SplitLocal:
    """Local work with a personal part: in alternation (FedRep) or jointly (FedSA-LoRA)."""

    def __init__(self, personal_of: Any, *, alternate: bool, personal_steps: int | None = None):
        self.personal_of = personal_of           # slot parameter names -> the personal ones
        self.alternate = alternate
        self.personal_steps = personal_steps

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        params = ctx.slot.params
        personal = self.personal_of(list(params))
        ctx.slot.overlay(personal_part(ctx.state))   # its own part over the initial one
        metrics: dict[str, Any] = {}
        if self.alternate:
            restore = trainable_only(params, {n for n in personal if params[n].requires_grad})
            try:
                head = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=derive_seed(ctx.seed, "personal"),
                                         steps=self.personal_steps)
            finally:
                restore()
            metrics["personal_train_loss"] = head.loss
            restore = trainable_only(params, {n for n in global_state if params[n].requires_grad})
        else:
            restore = lambda: None  # noqa: E731 (jointly: nothing to freeze)
        try:
            result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed)
        finally:
            restore()
        now = ctx.slot.get()
        keep_personal(ctx.state, {n: now[n] for n in personal})
        return LocalOutcome(update=shared_update(now, global_state),
                            metrics={**result_metrics(result), **metrics})

    def personal(self, ctx: PersonalContext) -> State | None:
        return personal_part(ctx.state)   # {} before it first trains: the initial personal part


def _local(config: FedRepConfig) -> SplitLocal:
    return SplitLocal(lambda names: fedrep_personal(config, names), alternate=True,
                      personal_steps=config.personal_steps)


def _view(config: FedRepConfig, slot: Any) -> PartialView:
    return PartialView(slot, fedrep_personal(config, list(slot.params)))


SPEC = register("fedrep", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
                local=_local, view=_view)
