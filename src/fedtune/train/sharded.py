"""Sharded local training (`train.sharding: fsdp`): PyTorch FSDP2 (`fully_shard`) splits the base
model and the adapter over the launch's ranks, each decoder layer gathered only while it runs;
every rank takes its share of each micro-batch, exactly as under DDP (train/distributed.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fedtune.config import TrainSection
from fedtune.errors import ModelError
from fedtune.models.adapters import reshard
from fedtune.ranks import Ranks
from fedtune.train.distributed import DataParallel, ranks


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself without one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard_model(model: torch.nn.Module, ranks: Ranks) -> int:
    """Shard `model` in place over the launch's ranks; returns how many layers were sharded.

    Each of the model's decoder layers (transformers' `_no_split_modules` classes, the unit
    accelerate's FSDP plugin wraps too) becomes its own FSDP unit; the transformers model holding
    them is the root, so that its own forward (the training loss, `generate`) gathers the
    embeddings and the head. Parameters become DTensors sharded on their first dimension.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ModelError(f"train.sharding: fsdp needs PyTorch's FSDP2 (fully_shard, torch >= 2.6; "
                         f"this is torch {torch.__version__})") from None
    inner = transformers_model(model)
    kinds = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ModelError(f"train.sharding: fsdp: {type(inner).__name__} names no decoder layer "
                         "class (_no_split_modules) to shard by; use train.sharding: none (DDP)")
    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    return len(layers)


def shard_for_launch(model: torch.nn.Module, section: TrainSection) -> bool:
    """Shard the model over the launch's ranks when the recipe asks for FSDP, or build its
    DeepSpeed engine (train/zero.py), when several processes were launched (one process keeps it
    whole); True when its parameters are sharded (FSDP, ZeRO-3), so every rank must take part in
    each forward pass and in gathering the adapter."""
    launch = ranks()
    if section.sharding == "none" or launch is None:
        return False
    if section.sharding == "deepspeed":
        from fedtune.train.zero import build_engine

        build_engine(model, section, launch)
        return section.zero_stage == 3
    shard_model(model, launch)
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class FullySharded:
    """LocalTrainer's split of the work under FSDP: the micro-batch shares, loss weights, dropout
    streams and totals of DDP (DataParallel, composed); FSDP itself reduce-scatters the averaged
    gradients into each rank's shard, once per optimizer step (after the last micro-batch)."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.world_size = ranks.world_size
        self._split = DataParallel(ranks)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as sharded at set-up (runtime/setup.py): nothing more to wrap."""
        if not is_sharded(model):
            raise ModelError("train.sharding: fsdp: the model was not sharded at set-up")
        reshard(model)  # an evaluation before may have left the root's weights gathered
        return model

    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        return self._split.shard(indices)

    @contextlib.contextmanager
    def syncing(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Gradients are reduced on the step's last micro-batch only (accumulated before)."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(last, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)

    def dropout_seed(self, seed: int) -> int:
        return self._split.dropout_seed(seed)

    def totals(self, *values: float) -> list[float]:
        return self._split.totals(*values)
