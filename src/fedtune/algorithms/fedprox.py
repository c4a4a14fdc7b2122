"""FedProx (Li et al. 2020): FedAvg whose local loss adds the proximal term μ/2·‖w − w_global‖²."""

from __future__ import annotations

import torch

from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    State,
    local_update,
    plain_local,
    register,
    result_metrics,
)
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.options import FedProxConfig


def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2 · Σ ‖p − anchor‖² over the trainable tensors (a differentiable scalar)."""
    total = sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
    return 0.5 * mu * total


@plain_local
class ProxLocal:
    batchable = True   # base.batchable(): trains through ctx.trainer.train on ctx.slot.params only
    def __init__(self, config: FedProxConfig):
        self.mu = config.mu

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        params = ctx.slot.params
        anchor = {n: global_state[n].to(p.device, p.dtype) for n, p in params.items()}
        extra = (lambda: proximal_term(params, anchor, self.mu)) if self.mu > 0 else None
        result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed, extra_loss=extra)
        return LocalOutcome(update=local_update(ctx.slot.get(), global_state),
                            metrics=result_metrics(result))


SPEC = register("fedprox", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)), local=ProxLocal)
