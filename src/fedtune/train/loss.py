"""Token-level causal LM loss over the response tokens (labels != -100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there are.

    Summing (not averaging) per micro-batch lets callers weight every token equally across
    micro-batches, which is what makes gradient accumulation equal to one large batch.
    """
    logits = model(**model_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1, :]
    # Prompt-tuning style methods prepend virtual tokens to the logits; keep the real positions.
    if logits.shape[1] != labels.shape[1]:
        logits = logits[:, -labels.shape[1]:, :]
    n_tokens = int((labels != -100).sum())
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
        ignore_index=-100, reduction="sum",
    )
    return loss, n_tokens


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
