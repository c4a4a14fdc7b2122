"""DeepSpeed ZeRO-2/3 local training (`train.sharding: deepspeed`) through accelerate's DeepSpeed
plugin: one engine per party, built at set-up, re-armed at every local-training call.

ZeRO's optimizer keeps its own float32 copy of each rank's partition of the trainable tensors,
and fedtune swaps a client's (or the global) adapter into the model at every turn and trains each
turn with a fresh optimizer. So each call first copies the model's adapter (what the slot set)
into those float32 partitions, empties the inner optimizer's state (AdamW's moments and step
count) and sets the round's learning rate: every call then behaves as a fresh AdamW on the
adapter it was given. The split of the work is DDP's (train/distributed.py): every rank its share
of each micro-batch, each share's loss weighted by the world size over the step's token count;
DeepSpeed averages the gradients over the ranks and clips them by their global norm
(`gradient_clipping`, the same rule as torch.nn.utils.clip_grad_norm_) before its step.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from fedtune.config import TrainSection
from fedtune.errors import ModelError
from fedtune.models.zero3 import note_step
from fedtune.ranks import Ranks
from fedtune.train.distributed import DataParallel

# The engine of each model built here, by id(model): one per party (AdapterSlot reads its steps).
_ENGINES: dict[int, Any] = {}


def require_deepspeed() -> None:
    """A clear error, before any work, when the optional deepspeed package is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ModelError("train.sharding: deepspeed needs the deepspeed package: "
                         "pip install 'fedtune[deepspeed]' (or use train.sharding: fsdp / none)")


def zero_config(section: TrainSection, stage: int) -> dict[str, Any]:
    """The DeepSpeed configuration of a party's engine (accelerate's DeepSpeedPlugin takes it).

    No fp16/bf16 section: the trainable adapter stays float32 in the model (what travels keeps its
    dtype) and the local step's autocast is fedtune's own (train/precision.py), as without ZeRO.
    The micro-batch size is DeepSpeed's bookkeeping only (fedtune feeds the batches); the
    accumulation boundary is set by the trainer on each step's last micro-batch.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": section.batch_size,
        "gradient_accumulation_steps": section.grad_accum,
        "gradient_clipping": float(section.max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW / SGD on the partitions
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if stage == 3:
        # Partition every tensor, the small adapter factors too (the default keeps tensors under
        # 100k elements whole on every rank); each rank then holds 1/N of the adapter's state.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config["zero_optimization"].update(section.zero_options)
    return config


def check_zero_options(section: TrainSection) -> None:
    """train.zero_options checked by DeepSpeed's own schema of `zero_optimization`, before any
    work (DeepSpeed refuses unknown names and out-of-range values)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero_config(section, section.zero_stage)["zero_optimization"])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelError(f"train.zero_options: {problems}") from None


def _optimizer(params: list[torch.nn.Parameter], section: TrainSection) -> torch.optim.Optimizer:
    """The inner optimizer ZeRO wraps (its learning rate is set at every call: ZeroSharded.start)."""
    if section.optimizer == "sgd":
        return torch.optim.SGD(params, lr=section.lr, weight_decay=section.weight_decay)
    return torch.optim.AdamW(params, lr=section.lr, weight_decay=section.weight_decay)


def _quiet_cpu_collectives() -> None:
    """On a CPU, let gloo carry DeepSpeed's collectives rather than its shared-memory kernel,
    which DeepSpeed compiles (a C++ compiler, about a minute) the first time a process needs it.
    DeepSpeed keeps the probed op table as one dict, so the edit persists."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    table = deepspeed.ops.__compatible_ops__
    table["deepspeed_shm_comm"] = False


def build_engine(model: torch.nn.Module, section: TrainSection, ranks: Ranks) -> Any:
    """The party's DeepSpeed engine over `model`'s trainable tensors (ZeRO-3: its every tensor
    partitioned over the ranks from now on), through accelerate's DeepSpeed plugin."""
    require_deepspeed()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    if _ENGINES:
        raise ModelError("train.sharding: deepspeed: one DeepSpeed engine per process; this process "
                         "already built one")
    _quiet_cpu_collectives()
    stage = section.zero_stage
    plugin = DeepSpeedPlugin(hf_ds_config=zero_config(section, stage))
    accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=section.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("train.sharding: deepspeed: the model has no trainable parameters")
    engine, _ = accelerator.prepare(model, _optimizer(params, section))
    if engine.module is not model:
        raise ModelError("train.sharding: deepspeed: accelerate wrapped the model unexpectedly")
    _ENGINES[id(model)] = engine
    return engine


def engine_of(model: torch.nn.Module) -> Any | None:
    """The DeepSpeed engine built over `model` in this process, if any."""
    return _ENGINES.get(id(model))


class ZeroSharded:
    """LocalTrainer's split of the work under DeepSpeed ZeRO: DDP's micro-batch shares, loss
    weights, dropout streams and totals (DataParallel, composed); the engine's backward and step
    (it reduces the gradients into each rank's partition, clips and steps at the boundary)."""

    def __init__(self, ranks: Ranks, engine: Any):
        self.ranks = ranks
        self.world_size = ranks.world_size
        self.engine = engine
        self._split = DataParallel(ranks)
        self._boundary = True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.engine.module is not model:
            raise ModelError("train.sharding: deepspeed: the engine was built over another model")
        return self.engine

    @torch.no_grad()
    def start(self, lr: float) -> None:
        """Re-arm the engine for one local-training call: the float32 partitions from the model's
        adapter (swapped in since), a fresh optimizer state, the call's learning rate."""
        zero = self.engine.optimizer
        zero.refresh_fp32_params()
        inner = zero.optimizer
        inner.state.clear()  # AdamW: no moments, step 0 (built again at the first step)
        for group in inner.param_groups:
            group["lr"] = lr
        self.engine.zero_grad()

    def shard(self, indices: list[int]) -> tuple[list[int], float]:
        return self._split.shard(indices)

    @contextlib.contextmanager
    def syncing(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """The step's last micro-batch is DeepSpeed's accumulation boundary: the reduced,
        clipped gradients are stepped there (accumulated in the partitions before)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self._boundary = last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """The engine's backward (no division by the accumulation steps: the trainer's weights
        already normalise by the step's tokens), then its step (a no-op before the boundary)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()
        if self._boundary:
            note_step(self.engine.module)  # the slot gathers the partitions again (AdapterSlot)

    def dropout_seed(self, seed: int) -> int:
        return self._split.dropout_seed(seed)

    def totals(self, *values: float) -> list[float]:
        return self._split.totals(*values)
