"""Where this process stands in a multi-process launch (torchrun / accelerate): its rank, the
world size and its device. At the bottom of the package, so loading a model can place it on the
launch's device; what local training does with the ranks is fedtune.train.distributed."""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import torch

from fedtune.errors import FedtuneError


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
                raise FedtuneError(f"accelerate launch with {what}: fedtune takes the sharding from "
                                  f"the recipe (train.sharding: {what.lower()}; docs/scaling.md), "
                                  f"not from the launcher; launch without --use_{what.lower()} "
                                  "(or with torchrun)")
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
