"""HetLoRA (Cho et al., EMNLP'24): clients of different LoRA ranks, zero-padded to the largest,
aggregated with weights by the norm of each client's product B_k·A_k, and a self-pruning
regulariser λ‖B_tail‖·‖A_tail‖ on the last γ of each client's components.

Clients exchange their own rank's part of the global adapter (models/rank_plan.py,
runtime/client_shapes.py): the server's global adapter has the largest rank r, a client of rank
r_k receives its first r_k components (truncation) and answers with an update of that shape.
The regulariser is computed on the live parameters, so it has a gradient (unlike the reference
code, which read `param.data`). When a client's tail norm shrank since its previous round, it
prunes: its rank becomes ⌊(1−γ)·r_k⌋ and it sends zeros for the pruned components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedtune.algorithms.base import (
    ClientUpdate,
    LocalContext,
    LocalOutcome,
    State,
    local_update,
    plain,
    plain_local,
    register,
    result_metrics,
)
from fedtune.algorithms.flexlora import lora_pairs
from fedtune.algorithms.options import HetLoRAConfig
from fedtune.models.rank_plan import pad, with_update

RANK, TAIL = "hetlora/rank", "hetlora/tail"   # a client's persistent state


def product_norm(state: State) -> float:
    """‖B·A‖_F over every LoRA pair of `state` (the root of the summed squares)."""
    pairs = lora_pairs(list(state))
    return math.sqrt(sum(float((state[b].double() @ state[a].double()).pow(2).sum())
                         for a, b in pairs.items()))


def norm_weights(local_states: Sequence[State]) -> list[float]:
    """ω_k = ‖B_kA_k‖_F / Σ_j ‖B_jA_j‖_F; equal weights when every product is zero."""
    norms = [product_norm(s) for s in local_states]
    total = sum(norms)
    if total <= 0:
        return [1.0 / len(norms)] * len(norms)
    return [n / total for n in norms]


def hetlora_aggregate(global_state: State, local_states: Sequence[State],
                      weights: Sequence[float]) -> State:
    """Σ_k ω_k · pad(local_k) over every tensor (weights normalised here), at the global rank."""
    if not local_states:
        raise ValueError("hetlora_aggregate needs at least one client")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("hetlora_aggregate: the weights must sum to a positive number")
    r_max = next((t.shape[0] for n, t in global_state.items() if ".lora_A." in n), None)
    out: State = {}
    padded = [pad(s, r_max) if r_max else s for s in local_states]
    for name, g in global_state.items():
        acc = sum((w / total) * p[name].double() for p, w in zip(padded, weights))
        out[name] = acc.to(g.dtype)
    return out


@plain
class HetLoRA:
    def __init__(self, config: HetLoRAConfig):
        self.config = config
        self.last: dict[str, Any] = {}

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        locals_ = [with_update(global_state, u.tensors) for u in updates]
        if self.config.weighting == "norm":
            weights = norm_weights(locals_)
        elif self.config.weighting == "examples":
            weights = [float(u.n_examples) for u in updates]
        else:
            weights = [1.0] * len(updates)
        total = sum(weights)
        self.last = {"hetlora_weights": {u.client: w / total for u, w in zip(updates, weights)}}
        return hetlora_aggregate(global_state, locals_, weights)

    def round_metrics(self) -> dict[str, Any]:
        return dict(self.last)


def tail_regulariser(params: dict[str, torch.Tensor], rank: int, gamma: float) -> torch.Tensor:
    """Σ over LoRA pairs of ‖B[:, t:rank]‖_F·‖A[t:rank, :]‖_F, t = ⌊(1−γ)·rank⌋ (differentiable)."""
    start = tail_start(rank, gamma)
    pairs = lora_pairs(list(params))
    terms = [params[b][:, start:rank].norm() * params[a][start:rank].norm() for a, b in pairs.items()]
    return torch.stack(terms).sum()


def tail_start(rank: int, gamma: float) -> int:
    return max(1, math.floor((1 - gamma) * rank))


@plain_local
class HetLoRALocal:
    """Local training with the self-pruning regulariser, and pruning when the tail shrinks."""

    def __init__(self, config: HetLoRAConfig):
        self.config = config

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        assigned = next(t.shape[0] for n, t in global_state.items() if ".lora_A." in n)
        rank = int(ctx.state[RANK]) if RANK in ctx.state else assigned
        params = ctx.slot.params
        pairs = lora_pairs(list(params))
        with torch.no_grad():  # components pruned in earlier rounds stay zero
            for a, b in pairs.items():
                params[a][rank:].zero_()
                params[b][:, rank:].zero_()
        cfg = self.config
        extra = (lambda: cfg.reg * tail_regulariser(params, rank, cfg.gamma)) if cfg.reg > 0 else None
        result = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed, extra_loss=extra)
        with torch.no_grad():
            tail = float(tail_regulariser(params, rank, cfg.gamma))
            previous = float(ctx.state[TAIL]) if TAIL in ctx.state else None
            new_rank = rank
            if cfg.prune and previous is not None and tail < previous and rank > 1:
                new_rank = tail_start(rank, cfg.gamma)
            for a, b in pairs.items():   # zeros beyond the rank, even where training moved them
                params[a][new_rank:].zero_()   # (DP-SGD's noise reaches every component)
                params[b][:, new_rank:].zero_()
        ctx.state[RANK] = torch.tensor(new_rank)
        ctx.state[TAIL] = torch.tensor(tail, dtype=torch.float64)
        metrics = {**result_metrics(result), "rank": new_rank, "tail_norm": tail}
        return LocalOutcome(update=local_update(ctx.slot.get(), global_state), metrics=metrics)


SPEC = register("hetlora", lambda config: HetLoRA(config), local=HetLoRALocal)
