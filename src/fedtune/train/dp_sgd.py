"""Local DP-SGD on a client's adapter parameters, through Opacus (`train.dp_sgd`).

Opacus computes per-example gradients of the trainable parameters only (hooks on the LoRA
Linear layers; the frozen base model's RMSNorm and rotary embeddings need no per-example
gradient), clips each example's gradient to C, adds N(0, (σC)²) to their sum once per optimizer
step and divides by the expected batch; its accountant turns the steps into (ε, δ).

How batches and accumulation work under DP-SGD (they differ from non-private training):

- Sampling is Poisson, as the accountant assumes: at every optimizer step each training
  example joins the step's batch independently with probability q = B / n, where
  B = train.batch_size × train.grad_accum is the *expected* batch and n the client's examples.
- The sampled batch is processed in micro-batches of at most train.batch_size examples (memory
  bound); their clipped per-example gradients are summed across micro-batches (Opacus'
  skip-step accumulation) and the noise is added ONCE per optimizer step, so grad_accum only
  sets the expected batch B, never the privacy per step.
- Every example weighs the same: its loss is the mean over its own response tokens. The
  token-weighted objective of non-private training divides by the step's total token count,
  which depends on the other examples, so an example's contribution would not be bounded alone.

The noise generator is seeded from the OS's secure randomness unless `noise_seed` is set (for
reproducible experiments only: anyone who knows the seed can remove the noise).
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.config import DPSGDSection
from fedtune.errors import FedtuneError
from fedtune.seeding import derive_seed
from fedtune.train.loss import example_losses

State = dict[str, torch.Tensor]
HISTORY = "dp_sgd/history"   # a client's persistent state: rows (σ, q, steps), float64


def require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise FedtuneError("train.dp_sgd needs Opacus: pip install 'fedtune[privacy]' "
                           "(or pip install opacus)") from None


@dataclass
class DPSteps:
    """The DP-SGD steps of one local run, as the accountant needs them."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def sample_rate(expected_batch: int, n_examples: int) -> float:
    return min(1.0, expected_batch / n_examples)


def poisson_batch(n: int, rate: float, rng: np.random.Generator) -> list[int]:
    """Indices of one Poisson-sampled batch: each of the n examples with probability `rate`."""
    return np.flatnonzero(rng.random(n) < rate).tolist()


def noise_generator(section: DPSGDSection, seed: int) -> torch.Generator:
    """Seeded from `noise_seed` and the local run's seed if set; else from secure randomness."""
    if section.noise_seed is not None:
        return torch.Generator().manual_seed(derive_seed(section.noise_seed, "dp-sgd", seed))
    return torch.Generator().manual_seed(secrets.randbits(63))


class PrivateGradients:
    """Per-example clipped, noised gradients for the trainable parameters of `model` (one local run).

    Use: `backward(batch)` for each micro-batch of a step's Poisson batch, then `privatize()`,
    which leaves the step's private gradient in `p.grad`; then the optimizer's step; finally
    `close()` removes Opacus' hooks and attributes from the shared model.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 section: DPSGDSection, expected_batch: int, generator: torch.Generator):
        require_opacus()
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.model = model
        # "sum": the per-example gradients are those of each example's own loss (we backprop
        # the sum of per-example mean losses); the optimizer divides by the expected batch.
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=section.noise_multiplier,
            max_grad_norm=section.max_grad_norm, expected_batch_size=expected_batch,
            loss_reduction="mean", generator=generator,
        )
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Clip and accumulate the micro-batch's per-example gradients; (loss sum, tokens)."""
        loss_sums, counts = example_losses(self.module, batch)
        with warnings.catch_warnings():
            # The first LoRA layer's input (frozen embeddings) needs no gradient: Opacus'
            # full backward hook still gets what it needs, torch just says so.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            (loss_sums / counts.clamp(min=1)).sum().backward()
        self.optimizer.signal_skip_step(do_skip=True)
        self.optimizer.pre_step()     # clip per example, add to the step's sum; no noise yet
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sums.detach().sum()), int(counts.sum())

    def privatize(self) -> None:
        """p.grad = (Σ clipped per-example gradients + N(0, (σC)²)) / expected batch."""
        for p in self.params:  # nothing more to add; also covers an empty Poisson batch
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.pre_step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.module.cleanup()
        for p in self.params:
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


# -- accounting -----------------------------------------------------------------------------


def dp_sgd_epsilon(history: list[tuple[float, float, int]], delta: float,
                   accountant: str = "rdp") -> float:
    """ε after the (σ, q, steps) entries of `history`, from Opacus' RDP or PRV accountant."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta))


def record_dp_steps(state: State, metrics: dict[str, Any], section: DPSGDSection) -> None:
    """Add a local run's DP-SGD steps (from its fit metrics) to the client's history in `state`
    (checkpointed with the client) and report the client's ε so far in `metrics`."""
    steps = metrics.get("dp_steps")
    if not isinstance(steps, int):
        raise FedtuneError("train.dp_sgd is on but the local procedure reported no DP-SGD steps "
                           "(it does not train through LocalTrainer)")
    row = torch.tensor([[metrics["dp_noise_multiplier"], metrics["dp_sample_rate"], steps]],
                       dtype=torch.float64)
    old = state.get(HISTORY)
    state[HISTORY] = row if old is None else torch.cat([old, row])
    history = [(s, q, int(n)) for s, q, n in state[HISTORY].tolist()]
    eps = dp_sgd_epsilon(history, section.delta, section.accountant)
    metrics["dp_epsilon"] = None if math.isinf(eps) else eps
    metrics["dp_delta"] = section.delta
