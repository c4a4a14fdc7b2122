"""FedKSeed (arXiv 2312.06353): zeroth-order full-parameter tuning where only scalars travel.

All parties share K candidate seeds; candidate k regenerates the perturbation z_k (on the CPU, from
the seed `derive_seed(pool_seed, "kseed", k)`, see train/zeroth_order.py). A local step samples a
candidate, takes the two-point estimate g = (L(θ+εz_k) − L(θ−εz_k)) / 2ε and steps θ ← θ − η·g·z_k.

The global model travels as ONE vector G of K scalars (`kseed/pool`, 16 KB for K = 4096):

    θ(G) = θ0 − Σ_k G_k · z_k,       applied for the k with G_k ≠ 0 in ascending k,


with θ0 the initial trainable tensors every party builds from the recipe. A client uploads the same
kind of vector, its steps folded per candidate (a_k = Σ η·g over its steps on k); its local model is
exactly θ(G + a) up to float rounding, so the server's G ← G + Σ_i w_i·a_i (w_i normalised) is
FedAvg of the clients' models. Every party rebuilds θ(G) by the same replay, in the same order,
with z regenerated on the CPU: the same G gives bit-identical tensors on every party of the same
device type. The cost of a rebuild is bounded by K perturbations, however many rounds have passed —
the point of a finite seed set. The learning rate is folded into G, so any schedule replays exactly;
weight decay would make the update non-linear and is refused (train.weight_decay must be 0).

FedKSeed-Pro (`pro: true`): candidates are sampled with probabilities p = softmax(minmax(m)), m_k the
mean |g| (clipped at `pro_clip`) seen for candidate k so far (0 before any), sent by the server each
round. The server sees one folded scalar per client and candidate, so m_k averages those (divided by
the round's η), a per-client stand-in for the per-step scalars of the paper.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from fedtune.algorithms.base import (
    ClientUpdate,
    LocalContext,
    LocalOutcome,
    ModelView,
    State,
    plain,
    plain_local,
    refuse_state,
    register,
)
from fedtune.algorithms.fedavg import client_weights
from fedtune.algorithms.options import FedKSeedConfig
from fedtune.data.prompts import collate
from fedtune.seeding import derive_seed
from fedtune.train.local import micro_batches, steps_for
from fedtune.train.zeroth_order import apply_zo_update, perturbation, projected_gradient
from fedtune.wire import TensorSpec

POOL = "kseed/pool"
PROBS = "kseed/probs"


def candidate_seed(config: FedKSeedConfig, k: int) -> int:
    """The generator seed of candidate k (the same on every party)."""
    return derive_seed(config.pool_seed, "kseed", int(k))


def ordered_params(slot) -> list[torch.nn.Parameter]:
    """The trainable tensors in the one order every party perturbs them in (sorted by name)."""
    return [slot.params[n] for n in sorted(slot.params)]


@torch.no_grad()
def replay(params: list[torch.Tensor], pool: torch.Tensor, config: FedKSeedConfig) -> int:
    """θ ← θ − Σ_k pool_k · z_k for the candidates with pool_k ≠ 0, ascending; returns how many."""
    values = pool.to(torch.float64).tolist()
    used = [k for k, v in enumerate(values) if v != 0.0]
    for k in used:
        for p, z in perturbation(candidate_seed(config, k), params):
            p.add_(z, alpha=-values[k])
    return len(used)


def pro_probabilities(mean_abs: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro: softmax of the min-max normalised mean |g| per candidate (uniform when flat)."""
    m = mean_abs.to(torch.float64)
    spread = float(m.max() - m.min())
    normalised = (m - m.min()) / spread if spread > 0 else torch.zeros_like(m)
    return torch.softmax(normalised, dim=0).to(torch.float32)


class KSeedView(ModelView):
    """The global model as K scalars; `load` rebuilds θ(G) from θ0 into the model.

    Keeps θ0 (one copy of the trainable tensors) and, because simulated clients rebuild the same G
    one after another, the last rebuilt tensors (one more copy), so a round replays once per process.
    """

    def __init__(self, config: FedKSeedConfig, slot):
        super().__init__(slot)
        self.config = config
        self.names = sorted(slot.params)
        self.theta0 = [slot.params[n].detach().clone() for n in self.names]
        self._cached_key: bytes | None = None
        self._cached: list[torch.Tensor] | None = None
        self.replayed = 0  # candidates replayed by this process (for benchmarks)

    def initial(self) -> State:
        return {POOL: torch.zeros(self.config.num_seeds, dtype=torch.float32)}

    @torch.no_grad()
    def load(self, state: State) -> None:
        pool = state[POOL].to(torch.float32).contiguous()
        key = hashlib.sha256(pool.numpy().tobytes()).digest()
        params = ordered_params(self.slot)
        if key == self._cached_key and self._cached is not None:
            for p, cached in zip(params, self._cached):
                p.copy_(cached)
            return
        for p, initial in zip(params, self.theta0):
            p.copy_(initial)
        self.replayed += replay(params, pool, self.config)
        self._cached_key, self._cached = key, [p.detach().clone() for p in params]


@plain
class FedKSeed:
    def __init__(self, config: FedKSeedConfig):
        self.config = config
        k = config.num_seeds
        self.abs_sum = torch.zeros(k, dtype=torch.float64)   # Pro: Σ |g| seen per candidate
        self.count = torch.zeros(k, dtype=torch.float64)     # Pro: how many scalars seen
        self.lrs: dict[int, float] = {}

    def configure_fit(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
        self.lrs[round_] = lr
        return {c: {"lr": lr} for c in clients}

    def fit_tensors(self, round_: int, global_state: State) -> State:
        return {PROBS: self.probabilities()} if self.config.pro else {}

    def probabilities(self) -> torch.Tensor:
        mean = torch.where(self.count > 0, self.abs_sum / self.count.clamp(min=1), torch.zeros_like(self.count))
        return pro_probabilities(mean)

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        weights = client_weights(updates, self.config.weighting)
        total = sum(weights)
        pool = global_state[POOL].to(torch.float64).clone()
        for u, w in zip(updates, weights):
            pool += (w / total) * u.tensors[POOL].to(torch.float64)
        if self.config.pro:
            lr = self.lrs.get(round_) or 1.0
            for u in updates:
                folded = u.tensors[POOL].to(torch.float64)
                seen = folded != 0
                self.abs_sum[seen] += (folded[seen] / lr).abs().clamp(max=self.config.pro_clip)
                self.count[seen] += 1
        self.lrs.pop(round_, None)
        return {POOL: pool.to(torch.float32)}

    def state_dict(self) -> State:
        return {"pro/abs_sum": self.abs_sum.clone(), "pro/count": self.count.clone()} if self.config.pro else {}

    def load_state_dict(self, state: State) -> None:
        if self.config.pro:
            self.abs_sum = state["pro/abs_sum"].to(torch.float64).clone()
            self.count = state["pro/count"].to(torch.float64).clone()
        else:
            refuse_state(self, state)


@plain_local
class KSeedLocal:
    """Local FedKSeed steps: sample a candidate, two forward passes, step along its z; no backward."""

    def __init__(self, config: FedKSeedConfig):
        self.config = config

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return {PROBS: TensorSpec((self.config.num_seeds,), torch.float32)} if self.config.pro else {}

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        start = time.perf_counter()
        config, trainer = self.config, ctx.trainer
        section = trainer.section
        params = ordered_params(ctx.slot)
        k = config.num_seeds
        rng = np.random.default_rng(derive_seed(ctx.seed, "kseed-sample"))
        probs = None
        if config.pro:
            p = ctx.server_tensors[PROBS].to(torch.float64).numpy()
            if not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
                from fedtune.errors import MessageError

                raise MessageError(f"{PROBS}: not a probability vector")
            probs = p / p.sum()
        batches = micro_batches(len(ctx.train), section.batch_size, ctx.seed)
        n_steps = steps_for(section, len(ctx.train))
        folded = torch.zeros(k, dtype=torch.float64)
        losses, skipped, seen = [], 0, 0
        trainer.model.eval()  # no dropout: both forward passes must see the same function
        for _ in range(n_steps):
            indices = next(batches)  # the last batch of an epoch may be short
            seen += len(indices)
            batch = collate([ctx.train[i] for i in indices], trainer.pad_id)
            batch = {name: v.to(trainer.device) for name, v in batch.items()}
            cand = int(rng.choice(k, p=probs)) if probs is not None else int(rng.integers(k))
            seed = candidate_seed(config, cand)
            grad, loss = projected_gradient(trainer.model, params, batch, seed, config.eps)
            losses.append(loss)
            if config.loss_diff_clip is not None and abs(grad * 2 * config.eps) > config.loss_diff_clip:
                skipped += 1
                continue
            apply_zo_update(params, seed, grad, ctx.lr)
            folded[cand] += ctx.lr * grad
        metrics = {"train_loss": sum(losses) / len(losses), "steps": n_steps, "skipped_steps": skipped,
                   "examples_seen": seen, "seeds_used": int((folded != 0).sum()),
                   "train_seconds": time.perf_counter() - start}
        return LocalOutcome(update={POOL: folded.to(torch.float32)}, metrics=metrics)


SPEC = register("fedkseed", lambda config: FedKSeed(config), local=KSeedLocal, view=KSeedView)
