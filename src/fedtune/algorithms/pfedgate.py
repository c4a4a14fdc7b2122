"""pFedGate (Chen et al. 2023) on a LoRA adapter: each client owns a small gating layer that turns
the shared adapter into a sparse personal one under its budget.

Blocks are the LoRA modules (one A/B pair each). The gate reads the mean-pooled frozen token
embeddings of a batch (attention-masked), applies one Linear layer (hidden size -> blocks) and a
sigmoid, and averages over the batch: one score g_b per block, floored at min(0.1, s). A greedy
knapsack keeps the highest-scoring blocks whose sizes fit in s·(adapter size) (at least one);
block b then contributes g_b·keep_b·ΔW_b, i.e. its B is scaled by g_b·keep_b, with the
straight-through estimator of the reference code (keep_b − sg(g_b) + g_b) so the gate learns
through the hard mask. Gate and adapter train jointly (the reference's bi_level_opt 0): the
adapter at the round's rate with the recipe's optimizer, the gate by SGD at `gate_lr`. Only the
adapter travels; the server averages it densely by examples as the reference does (a block a
client pruned still moves towards that client's copy, which did not change: the pitfall noted in
ALGORITHMS-2 §3). The gate stays in the client's state. The personal model is the adapter with
each B scaled by the gate's scores over the client's whole training set (its per-client gate).
"""

from __future__ import annotations

from typing import Any

import torch

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
from fedtune.algorithms.options import PFedGateConfig
from fedtune.algorithms.personal import PERSONAL
from fedtune.data.prompts import collate
from fedtune.errors import ModelError
from fedtune.seeding import derive_seed
from fedtune.train.local import LocalTrainer

GATE = PERSONAL + "gate."


def lora_blocks(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA module, in the adapter's order."""
    blocks = []
    for name in names:
        if ".lora_A." in f"{name}." or name.endswith(".lora_A"):
            b = name.replace("lora_A", "lora_B")
            if b not in names:
                raise ModelError(f"pfedgate: {name} has no matching {b}")
            blocks.append((name, b))
    if not blocks:
        raise ModelError("pfedgate gates LoRA modules; the adapter has no lora_A tensors")
    return blocks


def knapsack_keep(scores: list[float], sizes: list[int], budget: float) -> list[bool]:
    """Greedy 0/1 knapsack: the highest scores first while their sizes fit in `budget` (the
    first block always kept, so the personal model is never empty)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep, used = [False] * len(scores), 0
    for rank, i in enumerate(order):
        if rank == 0 or used + sizes[i] <= budget:
            keep[i] = True
            used += sizes[i]
    return keep


class Gate(torch.nn.Module):
    """Linear(hidden -> blocks) + sigmoid over mean-pooled token embeddings, floored at `floor`."""

    def __init__(self, hidden: int, blocks: int, floor: float):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, blocks)
        self.floor = floor

    def per_example(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.per_example(features).mean(0).clamp(min=self.floor)


def pooled_embeddings(model: torch.nn.Module, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the frozen input embeddings over each example's real tokens (batch x hidden)."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(input_ids).float()
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1).float()
        return (emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class GatedModel(torch.nn.Module):
    """The shared model with each LoRA B scaled by the gate's g_b·keep_b (straight-through)."""

    def __init__(self, model: torch.nn.Module, gate: Gate, blocks: list[tuple[str, str]],
                 sizes: list[int], budget: float):
        super().__init__()
        self.model, self.gate = model, gate
        self.blocks, self.sizes, self.budget = blocks, sizes, budget
        self.params = dict(model.named_parameters())

    def scales(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.masked(self.gate(pooled_embeddings(self.model, input_ids, attention_mask)))

    def masked(self, g: torch.Tensor) -> torch.Tensor:
        """g_b·keep_b in value; the gradient reaches g through the hard mask (straight-through)."""
        keep = torch.tensor(knapsack_keep(g.detach().tolist(), self.sizes, self.budget),
                            dtype=g.dtype, device=g.device)
        return g * (keep - g.detach() + g)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any):
        scale = self.scales(input_ids, attention_mask)
        gated = {b: self.params[b] * scale[i].to(self.params[b].dtype) for i, (_, b) in enumerate(self.blocks)}
        return torch.func.functional_call(self.model, gated, (input_ids,),
                                          {"attention_mask": attention_mask, **kw}, strict=False)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()


@plain_local
class PFedGateLocal:
    def __init__(self, config: PFedGateConfig):
        self.config = config

    def _gated(self, ctx: LocalContext | PersonalContext) -> GatedModel:
        model = ctx.trainer.model
        blocks = lora_blocks(list(ctx.slot.params))
        sizes = [ctx.slot.params[a].numel() + ctx.slot.params[b].numel() for a, b in blocks]
        hidden = model.get_input_embeddings().weight.shape[1]
        s = self.config.sparsity
        with torch.random.fork_rng(devices=[]):   # seeded, without touching the global RNG
            torch.manual_seed(derive_seed(ctx.seed, "pfedgate-init"))  # used the first time only
            gate = Gate(hidden, len(blocks), floor=min(0.1, s)).to(ctx.trainer.device)
        kept = {k[len(GATE):]: v for k, v in ctx.state.items() if k.startswith(GATE)}
        if kept:
            gate.load_state_dict(kept)
        return GatedModel(model, gate, blocks, sizes, s * sum(sizes))

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        gated = self._gated(ctx)
        trainer = LocalTrainer(gated, ctx.trainer.section, ctx.trainer.pad_id, ctx.trainer.device)
        gate_params = list(gated.gate.parameters())
        gate_opt = torch.optim.SGD(gate_params, lr=self.config.gate_lr)

        def step_gate() -> None:   # the gate's own SGD step on the same gradients
            gate_opt.step()
            gate_opt.zero_grad(set_to_none=True)

        result = trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed, before_step=step_gate, skip=gate_params)
        ctx.state.update({GATE + k: v.detach().to("cpu", copy=True) for k, v in gated.gate.state_dict().items()})
        return LocalOutcome(update=local_update(ctx.slot.get(), global_state), metrics=result_metrics(result))

    def personal(self, ctx: PersonalContext) -> State | None:
        if not any(k.startswith(GATE) for k in ctx.state) or not ctx.train:
            return {}
        gated, device = self._gated(ctx), ctx.trainer.device
        size = ctx.trainer.section.batch_size
        with torch.no_grad():   # the gate over the client's whole training part, batch by batch
            rows = []
            for start in range(0, len(ctx.train), size):
                batch = collate(ctx.train[start:start + size], ctx.trainer.pad_id)
                rows.append(gated.gate.per_example(pooled_embeddings(
                    gated.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))))
            scale = gated.masked(torch.cat(rows).mean(0).clamp(min=gated.gate.floor))
        adapter = ctx.slot.get()
        return {b: adapter[b] * float(scale[i]) for i, (_, b) in enumerate(gated.blocks)}


SPEC = register("pfedgate", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
                local=PFedGateLocal)
