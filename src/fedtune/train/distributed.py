"""Several processes per party (torchrun / accelerate launch): the process group, each rank's
device, and the data-parallel split of local training (DDP over each micro-batch's shards)."""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
from dataclasses import dataclass

import torch

from fedtune.errors import FedtuneError, RecipeError
from fedtune.seeding import derive_seed

log = logging.getLogger("fedtune.distributed")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 speaks for the party: transport, run directory, console, loggers."""
        return self.rank == 0


_RANKS: Ranks | None = None


def launched() -> bool:
    """Whether a launcher started several processes (WORLD_SIZE > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise FedtuneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def ranks() -> Ranks | None:
    """The process group of this launch, set up once by accelerate (NCCL on GPUs, gloo on CPU);
    None for a single process, where nothing changes."""
    global _RANKS
    if _RANKS is None and launched():
        for flag, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(flag, "false").lower() == "true":
                raise FedtuneError(f"accelerate launch with {what}: fedtune trains several devices per "
                                  "client with DDP only (see docs/scaling.md); launch without "
                                  f"--use_{what.lower()} (or torchrun)")
        if os.environ.get("FEDTUNE_DIST_BACKEND", "").lower() == "gloo" and torch.cuda.is_available():
            _RANKS = _gloo_on_shared_gpus()
        else:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            _RANKS = Ranks(state.process_index, state.num_processes, state.local_process_index,
                           torch.device(state.device))
        atexit.register(_shut_down)
        if _RANKS.rank:  # rank 0 speaks for the party; the others only say what goes wrong
            logging.getLogger("fedtune").setLevel(logging.ERROR)
    return _RANKS


def _gloo_on_shared_gpus() -> Ranks:
    """FEDTUNE_DIST_BACKEND=gloo: more ranks than GPUs, rank r on GPU r mod count, gradients
    exchanged over gloo. For trying the multi-rank path on a machine with one GPU (NCCL refuses
    two ranks on one device); slower than NCCL, never for real training."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    torch.distributed.init_process_group("gloo")
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), local, device)


def _shut_down() -> None:
    """Leave the process group in order at exit (each rank on its own, no collective)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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


def data_parallel() -> DataParallel | OneProcess:
    """How local training splits its micro-batches in this process."""
    r = ranks()
    return OneProcess() if r is None else DataParallel(r)


ZEROTH_ORDER = ("fedkseed", "fedmezo")


def check_launch(recipe) -> None:
    """Refuse, before any work, what cannot run on several ranks; say once what runs unsplit."""
    r = ranks()
    if r is None:
        return
    algorithm = recipe.federation.algorithm
    if recipe.train.dp_sgd is not None:
        raise RecipeError("train.dp_sgd under a multi-process launch: opacus' per-example clipping "
                          "and noise are not combined with DDP's gradient averaging here (the "
                          "noise would be drawn per rank); run DP-SGD clients as one process")
    if algorithm == "offsite":
        raise RecipeError("federation.algorithm offsite under a multi-process launch: the "
                          "emulator is distilled and trained in one process; launch it without "
                          "torchrun/accelerate")
    if algorithm in ZEROTH_ORDER and r.main:
        log.warning("%s estimates gradients from forward passes only: every one of the %d ranks "
                    "runs the same steps (correct, no speed-up)", algorithm, r.world_size)
