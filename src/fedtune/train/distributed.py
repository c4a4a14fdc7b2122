"""Several processes per party (torchrun / accelerate launch): the process group, each rank's
device, and the data-parallel split of local training (DDP over each micro-batch's shards)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import TYPE_CHECKING

import torch

from fedtune.errors import ModelError
from fedtune.ranks import Ranks, launched, ranks  # noqa: F401  (this module's API too)
from fedtune.seeding import derive_seed

if TYPE_CHECKING:
    from fedtune.train.sharded import FullySharded
    from fedtune.train.zero import ZeroSharded

log = logging.getLogger("fedtune.distributed")


class OneProcess:
    """Local training in one process: every micro-batch whole, nothing to synchronise."""

    world_size = 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        return indices, 1.0

    def syncing(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def totals(self, *values: float) -> list[float]:
        return list(values)

    def dropout_seed(self, seed: int) -> int:
        return seed


class DataParallel:
    """Data parallelism over the launch's ranks for LocalTrainer.

    Every rank sees the same micro-batch indices (same seed) and keeps its own share of each
    micro-batch; DDP (communication overlapped with backward) averages the gradients once per
    optimizer step, after the last micro-batch. The trainer scales each shard's loss by the world
    size over the token count of the whole step, so the averaged gradient is exactly one process's
    on the same global batch, and every rank then takes the same optimizer step.
    """

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.world_size = ranks.world_size
        self._wrapped: dict[int, torch.nn.Module] = {}

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in DDP (built once per model; the trainable parameters are fixed by then)."""
        ddp = self._wrapped.get(id(model))
        if ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            on_gpu = self.ranks.device.type == "cuda"
            # Every rank built the same model from the same seed: no start-up broadcast of the
            # frozen base (init_sync=False); buffers are constants of the model.
            known = inspect.signature(DistributedDataParallel).parameters
            options = {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {
                "broadcast_buffers": False}
            if "init_sync" in known:  # torch >= 2.4
                options["init_sync"] = False
            ddp = DistributedDataParallel(
                model, device_ids=[self.ranks.device.index] if on_gpu else None, **options)
            self._wrapped[id(model)] = ddp
        return ddp

    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        """This rank's examples of a micro-batch (every world_size-th) and the weight of its loss.

        A rank left without an example (a micro-batch smaller than the world) runs the first one
        with weight 0: DDP needs every rank in every backward, and its gradient adds nothing.
        """
        mine = indices[self.ranks.rank::self.world_size]
        if not mine:
            return indices[:1], 0.0
        return mine, float(self.world_size)

    def syncing(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are exchanged on the step's last micro-batch only (accumulated before)."""
        return contextlib.nullcontext() if last else model.no_sync()

    def dropout_seed(self, seed: int) -> int:
        """Rank 0 draws the dropout masks of one process; the others their own stream, so the
        ranks' shards do not share masks (with dropout the update equals one process's in
        distribution, not number for number)."""
        return seed if self.ranks.main else derive_seed(seed, "dropout-rank", self.ranks.rank)

    def totals(self, *values: float) -> list[float]:
        """Sums over the ranks (the step's loss and token counts, for the metrics)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.ranks.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def data_parallel(sharding: str = "none", model: torch.nn.Module | None = None,
                  ) -> DataParallel | OneProcess | FullySharded | ZeroSharded:
    """How local training splits its micro-batches in this process: one process, DDP, FSDP
    (`train.sharding: fsdp`, fedtune.train.sharded) or DeepSpeed ZeRO (`deepspeed`: the engine
    built over `model` at set-up, fedtune.train.zero)."""
    r = ranks()
    if r is None:
        return OneProcess()
    if sharding == "deepspeed":
        from fedtune.train.zero import ZeroSharded, engine_of

        engine = engine_of(model) if model is not None else None
        if engine is None:
            raise ModelError("train.sharding: deepspeed: no DeepSpeed engine was built over the "
                             "model at set-up")
        return ZeroSharded(r, engine)
    if sharding == "fsdp":
        from fedtune.train.sharded import FullySharded

        return FullySharded(r)
    return DataParallel(r)
