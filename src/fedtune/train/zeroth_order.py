"""Zeroth-order (MeZO-style) steps: gradients estimated from two forward passes, no backward.

The perturbation z ~ N(0, I) for every trainable tensor is regenerated from an integer seed by a
CPU `torch.Generator`, in parameter order, in float32, and only then moved to the parameter's
device and dtype. It is therefore bit-identical on every party and every device (CUDA RNG is
never used), and it is never stored: memory stays that of inference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.train.loss import token_loss_sum


def perturbation(seed: int, params: Iterable[torch.nn.Parameter]):
    """Yield (param, z) with z regenerated from `seed` for each parameter, in order."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % 2**63)
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        yield p, z.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def perturb(params: list[torch.nn.Parameter], seed: int, scale: float) -> None:
    """θ ← θ + scale·z(seed)."""
    for p, z in perturbation(seed, params):
        p.add_(z, alpha=scale)


@torch.no_grad()
def mean_loss(model, batch: dict[str, torch.Tensor]) -> float:
    loss_sum, n = token_loss_sum(model, batch)
    return loss_sum.item() / max(1, n)


@torch.no_grad()
def projected_gradient(model, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor],
                       seed: int, eps: float) -> tuple[float, float]:
    """g = (L(θ + εz) − L(θ − εz)) / 2ε, θ restored afterwards; returns (g, mean of the two losses)."""
    perturb(params, seed, eps)
    plus = mean_loss(model, batch)
    perturb(params, seed, -2 * eps)
    minus = mean_loss(model, batch)
    perturb(params, seed, eps)
    return (plus - minus) / (2 * eps), 0.5 * (plus + minus)


@torch.no_grad()
def apply_zo_update(params: list[torch.nn.Parameter], seed: int, grad: float, lr: float,
                    weight_decay: float = 0.0, decay_mask: list[bool] | None = None) -> None:
    """θ ← θ − lr·(g·z(seed) + λ·θ); `decay_mask` False excludes a tensor (biases, norms) from decay."""
    for i, (p, z) in enumerate(perturbation(seed, params)):
        if weight_decay and (decay_mask is None or decay_mask[i]):
            p.mul_(1 - lr * weight_decay)
        p.add_(z, alpha=-lr * grad)
