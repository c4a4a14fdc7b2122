"""Local training on one client's data: AdamW (or SGD), gradient clipping, real accumulation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedtune.config import TrainSection
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.train.loss import token_loss_sum


@dataclass
class LocalResult:
    loss: float          # mean loss per response token over all local steps
    steps: int           # optimizer steps taken
    examples: int        # examples processed (with repeats)
    tokens: int          # response tokens processed
    seconds: float


def lr_for_round(section: TrainSection, round_: int, rounds: int) -> float:
    """The learning rate of a round (1-based): warm-up, then the schedule across rounds."""
    if section.warmup_rounds and round_ <= section.warmup_rounds:
        return section.lr * round_ / (section.warmup_rounds + 1)
    span = max(1, rounds - section.warmup_rounds)
    progress = (round_ - section.warmup_rounds - 1) / span
    if section.lr_schedule == "linear":
        return section.lr * (1.0 - progress)
    if section.lr_schedule == "cosine":
        return section.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return section.lr


def steps_for(section: TrainSection, n_examples: int) -> int:
    """Optimizer steps a client takes in one round."""
    if section.local_steps is not None:
        return section.local_steps
    per_step = section.batch_size * section.grad_accum
    return max(1, math.ceil(section.local_epochs * n_examples / per_step))


def micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless index batches: a fresh seeded permutation every epoch; the last short batch kept."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n).tolist()
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


class LocalTrainer:
    """Runs a client's local steps on the shared model's trainable parameters."""

    def __init__(self, model: torch.nn.Module, section: TrainSection, pad_id: int, device: torch.device):
        self.model = model
        self.section = section
        self.pad_id = pad_id
        self.device = device

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        s = self.section
        if s.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, weight_decay=s.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)

    def train(
        self,
        examples: list[TokenizedExample],
        *,
        lr: float,
        seed: int,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        before_step: Callable[[], None] | None = None,
    ) -> LocalResult:
        """Train in place.

        `extra_loss` (e.g. FedProx's proximal term) is added once per optimizer step;
        `before_step` runs after the step's gradients are complete, before clipping (e.g.
        SCAFFOLD's gradient correction).
        """
        if not examples:
            raise ValueError("a client with no training examples cannot train")
        s = self.section
        start = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self._optimizer(params, lr)
        batches = micro_batches(len(examples), s.batch_size, seed)
        torch.manual_seed(seed)  # dropout masks
        self.model.train()
        total_loss, total_tokens, seen = 0.0, 0, 0
        n_steps = steps_for(s, len(examples))
        for _ in range(n_steps):
            group = [collate([examples[i] for i in next(batches)], self.pad_id) for _ in range(s.grad_accum)]
            group_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
            for batch in group:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss_sum, n_tok = token_loss_sum(self.model, batch)
                (loss_sum / group_tokens).backward()
                total_loss += loss_sum.item()
                total_tokens += n_tok
                seen += batch["input_ids"].shape[0]
            if extra_loss is not None:
                extra_loss().backward()
            if before_step is not None:
                before_step()
            if s.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return LocalResult(
            loss=total_loss / max(1, total_tokens), steps=n_steps, examples=seen,
            tokens=total_tokens, seconds=time.perf_counter() - start,
        )
