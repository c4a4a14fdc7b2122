"""Sequence packing: a micro-batch's examples laid end to end in few rows instead of padded rows.

Each example keeps its own positions (restarting at 0) and the model is called without an
attention mask, so transformers builds a block-diagonal causal mask from the position ids: no
token attends across an example boundary, and the first token of each example is never a target
of the one before it. The loss sum and token count are those of the padded batch; only the
padding's compute is saved. `check_packing` verifies this on the actual model once, since a model
whose attention ignores position-based boundaries would silently mix examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.data.prompts import IGNORE_INDEX, TokenizedExample
from fedtune.errors import ModelError


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row's total length <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def collate_packed(batch: Sequence[TokenizedExample], pad_id: int,
                   capacity: int | None = None) -> dict[str, torch.Tensor]:
    """Pack a micro-batch into rows of at most `capacity` tokens (default: its longest example,
    so a packed row is never wider than the padded batch): `input_ids`, `labels`, `position_ids`."""
    if not batch:
        raise ValueError("collate_packed needs at least one example")
    lengths = [len(ex) for ex in batch]
    rows = pack_rows(lengths, capacity or max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Padding at a row's end is a segment of its own (positions from 0): it attends to nothing
    # real, and nothing real attends to it (it comes last, and attention is causal).
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex, n = batch[i], lengths[i]
            input_ids[r, at:at + n] = torch.from_numpy(ex.ids)
            labels[r, at:at + n] = torch.from_numpy(ex.label_ids)
            labels[r, at] = IGNORE_INDEX   # never predicted from the previous example's last token
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@torch.no_grad()
def check_packing(model: torch.nn.Module, device: torch.device, vocab_size: int) -> None:
    """Raise ModelError unless packed rows give the same logits as the examples run alone."""
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        low = min(3, vocab_size - 1)
        a = torch.randint(low, vocab_size, (1, 5), generator=gen)
        b = torch.randint(low, vocab_size, (1, 7), generator=gen)
        alone = [model(input_ids=x.to(device), attention_mask=torch.ones_like(x).to(device),
                       use_cache=False).logits.float() for x in (a, b)]
        packed = model(input_ids=torch.cat([a, b], dim=1).to(device),
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device),
                       use_cache=False).logits.float()
    except Exception as exc:  # a model that refuses position_ids without a mask
        raise ModelError(f"train.packing: this model cannot run packed rows ({exc}); "
                         "set train.packing false") from None
    finally:
        model.train(was_training)
    expected = torch.cat(alone, dim=1)
    if packed.shape != expected.shape:
        raise ModelError("train.packing: this adapter method changes the sequence length "
                         "(virtual tokens); set train.packing false")
    half = any(p.dtype != torch.float32 for p in model.parameters())   # bf16/fp16/quantized
    tol = (2e-2 if half else 1e-4) * max(1.0, float(expected.abs().max()))
    gap = float((packed - expected).abs().max())
    if gap > tol:
        raise ModelError(
            f"train.packing: this model's attention crosses example boundaries in packed rows "
            f"(logits differ by {gap:.3g}); its attention implementation does not use position "
            "ids as boundaries. Set train.packing false."
        )


def length_groups(lengths: Sequence[int], extra_cost: int, max_groups: int = 4) -> list[list[int]]:
    """Split a batch into at most `max_groups` sub-batches of similar lengths, each padded only to
    its own longest example: indices per group (shortest group first). Exact dynamic programming
    over the sorted lengths, minimising padded tokens + `extra_cost` tokens per extra group (the
    fixed cost of one more forward and backward pass)."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    values = sorted(set(lengths))          # a group always ends at the last example of a length
    ends = [0] * len(values)               # ends[v]: how many examples have length <= values[v]
    at = 0
    for v, value in enumerate(values):
        while at < len(order) and lengths[order[at]] == value:
            at += 1
        ends[v] = at
    n = len(values)
    inf = float("inf")
    # cost[g][v]: cheapest layout of the examples up to values[v] in g groups; cut: where it starts
    cost = [[inf] * n for _ in range(max_groups + 1)]
    cut = [[-1] * n for _ in range(max_groups + 1)]
    for v in range(n):
        cost[1][v] = ends[v] * values[v]
    for g in range(2, max_groups + 1):
        for v in range(n):
            for u in range(v):             # the last group holds lengths values[u+1..v]
                c = cost[g - 1][u] + (ends[v] - ends[u]) * values[v]
                if c < cost[g][v]:
                    cost[g][v], cut[g][v] = c, u
    best = min(range(1, max_groups + 1), key=lambda g: (cost[g][n - 1] + (g - 1) * extra_cost, g))
    groups: list[list[int]] = []
    v, g = n - 1, best
    while g > 1:
        u = cut[g][v]
        groups.append(order[ends[u]:ends[v]])
        v, g = u, g - 1
    groups.append(order[:ends[v]])
    return groups[::-1]
