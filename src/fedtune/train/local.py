"""Local training on one client's data: AdamW (or SGD), gradient clipping, real accumulation;
optionally DP-SGD (per-example clipping and noise, fedtune.train.dp_sgd)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.config import TrainSection
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.errors import ModelError
from fedtune.train.distributed import DataParallel, OneProcess
from fedtune.train.dp_sgd import (
    DPSteps,
    PrivateGradients,
    noise_generator,
    poisson_batch,
    require_opacus,
    sample_rate,
)
from fedtune.train.loss import response_loss_sum, targets_of
from fedtune.train.packing import check_packing, collate_packed
from fedtune.train.precision import Precision, base_dtype

if TYPE_CHECKING:
    from fedtune.train.sharded import FullySharded
    from fedtune.train.zero import ZeroSharded


@dataclass
class LocalResult:
    loss: float          # mean loss per response token over all local steps
    steps: int           # optimizer steps taken
    examples: int        # examples processed (with repeats)
    tokens: int          # response tokens processed
    seconds: float
    dp: DPSteps | None = None   # with train.dp_sgd: what the privacy accountant needs


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


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    The non-reentrant variant works with a frozen base (no input needs a gradient) and with
    peft's wrappers; transformers applies it in training mode only.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ModelError(f"train.gradient_checkpointing: {type(target).__name__} does not "
                         "support gradient checkpointing")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class LocalTrainer:
    """Runs a client's local steps on the shared model's trainable parameters."""

    def __init__(self, model: torch.nn.Module, section: TrainSection, pad_id: int, device: torch.device,
                 parallel: DataParallel | OneProcess | FullySharded | ZeroSharded | None = None):
        self.model = model
        self.section = section
        self.pad_id = pad_id
        self.device = device
        self.parallel = parallel or OneProcess()  # several ranks: each takes its share of a batch
        if section.dp_sgd is not None:
            require_opacus()
        self.precision = Precision(section.precision, device, base_dtype(model))
        if hasattr(self.parallel, "engine") and self.precision.mode == "fp16":
            raise ModelError("train.precision fp16 with train.sharding: deepspeed: not available "
                             "(fedtune's gradient scaler cannot reach ZeRO's partitions); use bf16")
        if section.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if section.packing:
            check_packing(model, device, int(model.get_input_embeddings().num_embeddings))
        self._collate = collate_packed if section.packing else collate

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
        steps: int | None = None,
        skip: Sequence[torch.nn.Parameter] = (),
    ) -> LocalResult:
        """Train in place (`steps` optimizer steps; default: the recipe's budget, `steps_for`).
        Parameters in `skip` get gradients but are left to the caller to step (`before_step`).

        `extra_loss` (e.g. FedProx's proximal term) is added once per optimizer step;
        `before_step` runs after the step's gradients are complete, before clipping (e.g.
        SCAFFOLD's gradient correction).
        """
        if not examples:
            raise ValueError("a client with no training examples cannot train")
        s = self.section
        start = time.perf_counter()
        model = self.parallel.wrap(self.model)  # DDP / FSDP / ZeRO engine over the ranks, else the model
        params = [p for p in self.model.parameters() if p.requires_grad and all(p is not q for q in skip)]
        zero = self.parallel if hasattr(self.parallel, "engine") else None  # DeepSpeed: train/zero.py
        if zero is not None:
            if extra_loss is not None or before_step is not None or skip:
                raise ModelError("train.sharding: deepspeed: the engine takes the whole step; an "
                                 "algorithm's proximal term or gradient correction is not available")
            zero.start(lr)  # the adapter swapped in, a fresh optimizer state, this call's lr
        optimizer = self._optimizer(params, lr) if zero is None else None
        batches = micro_batches(len(examples), s.batch_size, seed)
        torch.manual_seed(self.parallel.dropout_seed(seed))  # dropout masks (each rank its own)
        self.model.train()
        n_steps = steps if steps is not None else steps_for(s, len(examples))
        if s.dp_sgd is not None:
            try:
                return self._train_private(examples, params, optimizer, n_steps, seed, start,
                                           extra_loss, before_step)
            finally:
                self.model.eval()
        running = torch.zeros((), device=self.device)
        total_tokens, seen = 0, 0
        scaler = self.precision.scaler()
        parallel = self.parallel
        for _ in range(n_steps):
            indices = [next(batches) for _ in range(s.grad_accum)]
            group = [self._collate([examples[i] for i in idx], self.pad_id) for idx in indices]
            group_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
            for j, (idx, batch) in enumerate(zip(indices, group)):
                mine, weight = parallel.shard(idx)  # this rank's share of the micro-batch
                if mine is not idx:
                    batch = self._collate([examples[i] for i in mine], self.pad_id)
                targets = targets_of(batch["labels"]).to(self.device)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with parallel.syncing(model, last=j == len(group) - 1):
                    with self.precision.autocast():
                        loss_sum = response_loss_sum(model, batch, targets)
                    scaled = loss_sum * weight / group_tokens
                    if zero is not None:
                        zero.backward(scaled)  # the engine steps at the step's last micro-batch
                    else:
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                if weight:
                    running = running + loss_sum.detach()   # read once at the end: no wait per step
                    total_tokens += targets.count
                    seen += len(mine)
            if zero is None:
                self._step(params, optimizer, extra_loss, before_step, scaler)
                optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        total_loss, total_tokens, seen = parallel.totals(float(running), total_tokens, seen)
        total_tokens, seen = int(total_tokens), int(seen)
        return LocalResult(
            loss=total_loss / max(1, total_tokens), steps=n_steps, examples=seen,
            tokens=total_tokens, seconds=time.perf_counter() - start,
        )

    def _step(self, params, optimizer, extra_loss, before_step, scaler=None) -> None:
        """The optimizer step on the gradients in `p.grad` (after the data terms are in).

        With fp16's gradient scaler the data gradients are unscaled first, so the proximal term,
        SCAFFOLD's correction and clipping see true values; a step whose gradients overflowed is
        skipped (and the scale lowered) rather than written into the adapter as inf or NaN.
        """
        if scaler is not None:
            scaler.unscale_(optimizer)
        if extra_loss is not None:
            extra_loss().backward()
        if before_step is not None:
            before_step()
        if self.section.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.section.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def _train_private(self, examples, params, optimizer, n_steps, seed, start,
                       extra_loss, before_step) -> LocalResult:
        """DP-SGD: Poisson batches, per-example clipping, noise once per step (train/dp_sgd.py).

        What follows the noise is post-processing and keeps the guarantee: FedProx's proximal
        term, SCAFFOLD's correction, train.max_grad_norm on the noised gradient, the optimizer.
        """
        s, dp = self.section, self.section.dp_sgd
        expected = s.batch_size * s.grad_accum
        rate = sample_rate(expected, len(examples))
        rng = np.random.default_rng(seed)
        private = PrivateGradients(self.model, optimizer, dp, expected, noise_generator(dp, seed))
        total_loss, total_tokens, seen = 0.0, 0, 0
        try:
            for _ in range(n_steps):
                chosen = poisson_batch(len(examples), rate, rng)
                for first in range(0, len(chosen), s.batch_size):
                    batch = collate([examples[i] for i in chosen[first:first + s.batch_size]],
                                    self.pad_id)
                    loss, tokens = private.backward({k: v.to(self.device) for k, v in batch.items()})
                    total_loss += loss
                    total_tokens += tokens
                seen += len(chosen)
                private.privatize()
                self._step(params, optimizer, extra_loss, before_step)
                private.zero_grad()
        finally:
            private.close()
        return LocalResult(
            loss=total_loss / max(1, total_tokens), steps=n_steps, examples=seen,
            tokens=total_tokens, seconds=time.perf_counter() - start,
            dp=DPSteps(dp.noise_multiplier, rate, n_steps),
        )
