"""FedAvg + FT: plain FedAvg, and before each evaluation every client fine-tunes a copy of the
global adapter on its own data for a few steps (the pFL-Bench "-FT" baseline); the fine-tuned
model is its personal model. Nothing personal is kept between rounds (pFL-Bench's reference code
fine-tunes in place and carries it into the next round; here the global model is reloaded)."""

from __future__ import annotations

from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    PersonalContext,
    StandardLocal,
    State,
    plain_local,
    register,
)
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.options import FedAvgFTConfig
from fedtune.algorithms.personal import fine_tune


@plain_local
class FineTuneLocal:
    def __init__(self, config: FedAvgFTConfig):
        self.config = config
        self.standard = StandardLocal()

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        return self.standard.fit(ctx, global_state)

    def personal(self, ctx: PersonalContext) -> State | None:
        return fine_tune(ctx, self.config.ft_steps, self.config.ft_lr)


SPEC = register("fedavg_ft", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
                local=FineTuneLocal)
