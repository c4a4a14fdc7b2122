"""DeepSpeed ZeRO-3 parameters as the adapter slot sees them: each rank holds 1/N of a
parameter's flattened elements (`ds_tensor`); written rank by rank, gathered whole, counted whole,
and the count of optimizer steps taken on them (train/zero.py notes each one)."""

from __future__ import annotations

import torch

from fedtune.errors import ModelError

# Optimizer steps taken on each model's ZeRO-3 partitions, by id(model): the same on every rank.
_STEPS: dict[int, int] = {}


def is_zero3(param: torch.Tensor) -> bool:
    """Whether a parameter is DeepSpeed ZeRO-3's (its elements partitioned over the ranks)."""
    return hasattr(param, "ds_tensor")


def whole_numel(param: torch.Tensor) -> int:
    """A parameter's whole element count (a ZeRO-3 parameter's own tensor is empty)."""
    return int(param.ds_numel) if is_zero3(param) else param.numel()


def note_step(model: torch.nn.Module) -> None:
    """One optimizer step was taken on `model`'s partitions (on every rank alike)."""
    _STEPS[id(model)] = _STEPS.get(id(model), 0) + 1


def zero3_steps(model: torch.nn.Module) -> int:
    """How many optimizer steps have been taken on `model`'s partitions."""
    return _STEPS.get(id(model), 0)


def gather_zero3(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters gathered whole (a collective: every rank must call it)."""
    import deepspeed

    zero3 = [p for p in params.values() if is_zero3(p)]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        return {n: p.detach().clone() for n, p in params.items()}


def assign_partition(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write this rank's partition of a whole tensor; no collective. Rank r holds elements
    [r*n, (r+1)*n) of the flattened tensor (the last partition padded with zeros). A parameter
    gathered whole at the moment (or kept whole on every rank) gets the whole value too."""
    import torch.distributed as dist

    if tuple(value.shape) != tuple(param.ds_shape):
        raise ModelError(f"adapter tensor of shape {tuple(value.shape)} for a parameter of shape "
                         f"{tuple(param.ds_shape)}")
    part = param.ds_tensor
    flat = value.detach().reshape(-1).to(device=part.device, dtype=part.dtype)
    size = part.numel()
    start = size * dist.get_rank(group=getattr(param, "ds_process_group", None))
    count = max(0, min(flat.numel() - start, size))
    part.zero_()
    part.view(-1)[:count].copy_(flat[start:start + count])
    if param.data.numel() == flat.numel():
        param.data.copy_(flat.view_as(param.data))
