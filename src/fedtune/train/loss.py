"""Token-level causal LM loss over the response tokens (labels != -100)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.data.prompts import IGNORE_INDEX


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The forward arguments of a training batch: a padded batch has an attention mask; a packed
    one (fedtune.train.packing) has position ids instead, from which the model builds its
    block-diagonal mask. No key-value cache: nothing is generated."""
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


@dataclass(frozen=True)
class Targets:
    """The labelled positions of a batch, found on the CPU before the batch moves to its device:
    example `row[i]` predicts `label[i]` from its position `col[i]` (of `labels[:, 1:]`)."""

    row: torch.Tensor
    col: torch.Tensor
    label: torch.Tensor
    count: int

    def to(self, device: torch.device) -> Targets:
        return Targets(self.row.to(device), self.col.to(device), self.label.to(device), self.count)


def targets_of(labels: torch.Tensor) -> Targets:
    shifted = labels[:, 1:]
    row, col = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return Targets(row, col, shifted[row, col], int(row.numel()))


# Logit entries turned into log-probabilities at once when no gradient is kept (evaluation,
# zeroth-order steps): bounds the loss's own memory to about 2 x 64 MB beyond the logits.
CHUNK = 1 << 24


def response_loss_sum(model, batch: dict[str, torch.Tensor], targets: Targets) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled positions, as a tensor on the device.

    Only the labelled rows of the logits are taken (`index_select`), so the float32 copy and the
    softmax cost (response tokens x vocabulary) rather than (all positions x vocabulary); nothing
    here waits for the device, so the next micro-batch can be queued while this one runs.
    """
    logits = model(**model_inputs(batch)).logits
    # Prompt-tuning style methods prepend virtual tokens to the logits: the real positions are last.
    offset = logits.shape[1] - batch["input_ids"].shape[1]
    flat = logits.reshape(-1, logits.shape[-1])
    index = targets.row * logits.shape[1] + offset + targets.col
    if torch.is_grad_enabled():
        return F.cross_entropy(flat.index_select(0, index).float(), targets.label, reduction="sum")
    total = flat.new_zeros((), dtype=torch.float32)
    rows = max(1, CHUNK // logits.shape[-1])
    for part, label in zip(index.split(rows), targets.label.split(rows)):
        total = total + F.cross_entropy(flat.index_select(0, part).float(), label, reduction="sum")
    return total


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there are.

    Summing (not averaging) per micro-batch lets callers weight every token equally across
    micro-batches, which is what makes gradient accumulation equal to one large batch.
    """
    targets = targets_of(batch["labels"].cpu())
    return response_loss_sum(model, batch, targets.to(batch["input_ids"].device)), targets.count


def example_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed next-token cross-entropy over its labelled positions, and how many.

    Returns two tensors of shape (batch,): loss sums (float32) and token counts (long). DP-SGD
    needs each example's own loss, since it bounds each example's gradient separately.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1, :]
    if logits.shape[1] != labels.shape[1]:
        logits = logits[:, -labels.shape[1]:, :]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
        ignore_index=-100, reduction="none",
    ).view(labels.shape)
    return per_token.sum(dim=1), (labels != -100).sum(dim=1)
