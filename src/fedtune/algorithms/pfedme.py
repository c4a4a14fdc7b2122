"""pFedMe (T. Dinh et al. 2020) on the adapter: min_w Σ_i min_θ f_i(θ) + λ/2‖θ − w‖².

Client, for each of its R local rounds (the recipe's local budget): take one batch; approximate
the personal θ with K steps (`inner_steps`, `personal_lr`) on f_i(θ) + λ/2‖θ − w_i‖² over that
batch; then w_i ← w_i − η·λ·(w_i − θ) (η: the round's learning rate). θ persists in the client's
state and is what the client evaluates (the reference code writes w over θ at the end of a fit,
so its evaluation never sees θ; here it does). Server: w ← w + β·mean_k(w_k − w) (β = 1: FedAvg).
The proximal term is on the adapter's own tensors (for LoRA, a proxy for the products' distance).
"""

from __future__ import annotations

from fedtune.algorithms.base import (
    ClientUpdate,
    LocalContext,
    LocalOutcome,
    PersonalContext,
    State,
    plain,
    plain_local,
    register,
)
from fedtune.algorithms.fedavg import client_weights, fedavg_aggregate
from fedtune.algorithms.fedprox import proximal_term
from fedtune.algorithms.options import PFedMeConfig
from fedtune.algorithms.personal import keep_personal, personal_part
from fedtune.seeding import derive_seed
from fedtune.train.local import micro_batches, steps_for


@plain
class PFedMe:
    def __init__(self, config: PFedMeConfig):
        self.config = config

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        beta = self.config.beta
        weights = client_weights(updates, self.config.weighting)
        return fedavg_aggregate(global_state, [({k: beta * v for k, v in u.tensors.items()}, w)
                                               for u, w in zip(updates, weights)])


@plain_local
class PFedMeLocal:
    def __init__(self, config: PFedMeConfig):
        self.config = config

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        c, section = self.config, ctx.trainer.section
        w = ctx.slot.get()
        theta = personal_part(ctx.state) or dict(w)
        params = ctx.slot.params
        batches = micro_batches(len(ctx.train), section.batch_size, ctx.seed)
        rounds = steps_for(section, len(ctx.train))
        losses, seen, seconds = [], 0, 0.0
        for r in range(rounds):
            batch = [ctx.train[i] for i in next(batches)]
            seen += len(batch)
            ctx.slot.set(theta)
            anchor = {n: w[n].to(p.device, p.dtype) for n, p in params.items()}
            inner = ctx.trainer.train(
                batch, lr=c.personal_lr or ctx.lr, seed=derive_seed(ctx.seed, "pfedme", r),
                steps=c.inner_steps, extra_loss=lambda anchor=anchor: proximal_term(params, anchor, c.lam))
            losses.append(inner.loss)
            seconds += inner.seconds
            theta = ctx.slot.get()
            w = {n: w[n] - ctx.lr * c.lam * (w[n] - theta[n]) for n in w}
        keep_personal(ctx.state, theta)
        ctx.slot.set(w)
        update = {n: w[n] - g.to(w[n].dtype) for n, g in global_state.items()}
        return LocalOutcome(update=update, metrics={
            "train_loss": sum(losses) / len(losses), "steps": rounds * c.inner_steps,
            "examples_seen": seen, "train_seconds": seconds})

    def personal(self, ctx: PersonalContext) -> State | None:
        return personal_part(ctx.state)


SPEC = register("pfedme", PFedMe, local=PFedMeLocal)
