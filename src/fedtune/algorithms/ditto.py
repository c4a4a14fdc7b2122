"""Ditto (Li et al. 2021) on the adapter: each round a client trains the global adapter as FedAvg
does (that update is all it sends), then its personal adapter v_k on its own loss plus
λ/2·‖v_k − w^t‖² (w^t: the global adapter it received). v_k lives in the client's persistent
state (checkpointed; kept by a deployed client in its own directory) and never travels. Only
adapter tensors are copied, never the base model. The proximal term is on the adapter's own
tensors (for LoRA: ‖A − A'‖² + ‖B − B'‖², a proxy for the distance between the products)."""

from __future__ import annotations

from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    PersonalContext,
    State,
    local_update,
    plain_local,
    register,
    result_metrics,
)
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.fedprox import proximal_term
from fedtune.algorithms.options import DittoConfig
from fedtune.algorithms.personal import keep_personal, personal_part
from fedtune.seeding import derive_seed


@plain_local
class DittoLocal:
    def __init__(self, config: DittoConfig):
        self.config = config

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        w_t = ctx.slot.get()                                   # the global adapter received
        result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed)
        update = local_update(ctx.slot.get(), global_state)   # (a) the global update, sent
        v = personal_part(ctx.state) or w_t                   # v_k, from w the first time
        ctx.slot.set(v)
        params = ctx.slot.params
        anchor = {n: w_t[n].to(p.device, p.dtype) for n, p in params.items()}
        lam = self.config.lam
        personal = ctx.trainer.train(
            ctx.train, lr=self.config.personal_lr or ctx.lr,
            seed=derive_seed(ctx.seed, "ditto-personal"), steps=self.config.personal_steps,
            extra_loss=(lambda: proximal_term(params, anchor, lam)) if lam > 0 else None)
        keep_personal(ctx.state, ctx.slot.get())             # (b) v_k, kept
        metrics = result_metrics(result)
        metrics["personal_train_loss"] = personal.loss
        return LocalOutcome(update=update, metrics=metrics)

    def personal(self, ctx: PersonalContext) -> State | None:
        return personal_part(ctx.state)   # {} before the client first trains: the global model


SPEC = register("ditto", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)), local=DittoLocal)
