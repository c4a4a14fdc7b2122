"""What a multi-process launch (torchrun / accelerate: train/distributed.py) refuses before any
work, and what it runs unsplit: DP-SGD, and what the algorithm's catalog row says of itself."""

from __future__ import annotations

import importlib.util
import logging

from fedtune.algorithms.catalog import CATALOG
from fedtune.config import Recipe
from fedtune.errors import ModelError, RecipeError
from fedtune.train.distributed import ranks

log = logging.getLogger("fedtune.distributed")


def check_launch(recipe: Recipe) -> None:
    """Refuse, before any work, what cannot run on several ranks; say once what runs unsplit."""
    check_sharding(recipe)
    r = ranks()
    if r is None:
        return
    algorithm = recipe.federation.algorithm
    if recipe.federation.engine != "inprocess":
        raise RecipeError(f"federation.engine {recipe.federation.engine} under a multi-process "
                          "launch: its actors are the parallel workers; launch it as one process")
    if recipe.train.dp_sgd is not None:
        raise RecipeError("train.dp_sgd under a multi-process launch: opacus' per-example clipping "
                          "and noise are not combined with DDP's gradient averaging here (the "
                          "noise would be drawn per rank); run DP-SGD clients as one process")
    info = CATALOG[algorithm]
    if info.one_process is not None:
        raise RecipeError(f"federation.algorithm {algorithm} under a multi-process launch: "
                          f"{info.one_process}")
    if info.unsplit_ranks is not None and r.main:
        log.warning("%s %s: every one of the %d ranks runs the same steps (correct, no speed-up)",
                    algorithm, info.unsplit_ranks, r.world_size)


def check_sharding(recipe: Recipe) -> None:
    """Refuse, before any work, a train.sharding the launch or the recipe cannot run."""
    train = recipe.train
    sharding = train.sharding
    if sharding == "none":
        return
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed ZeRO"}[sharding]
    key = f"train.sharding: {sharding}"
    if sharding == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise RecipeError(f"{key} needs the deepspeed package: pip install 'fedtune[deepspeed]' "
                              "(or use train.sharding: fsdp / none)")
        if train.precision == "fp16":
            raise RecipeError(f"{key} with train.precision: fp16: not available (fedtune's gradient "
                              "scaler cannot reach ZeRO's partitions); use bf16")
        if train.zero_options:
            from fedtune.train.zero import check_zero_options

            try:
                check_zero_options(train)
            except ModelError as exc:
                raise RecipeError(str(exc)) from None
    r = ranks()
    if r is None:
        log.warning("%s in one process: nothing to shard over; launch the party with torchrun or "
                    "accelerate launch to shard it", key)
        return
    fed, adapter = recipe.federation, recipe.adapter
    if not CATALOG[fed.algorithm].fsdp:
        runs = ", ".join(n for n, info in CATALOG.items() if info.fsdp)
        raise RecipeError(f"{key} with federation.algorithm {fed.algorithm}: its client hooks read "
                          f"whole parameters or gradients (each rank holds a share of them under "
                          f"{name}); {name} runs {runs} (or use train.sharding: none, DDP)")
    if adapter.method != "lora":
        raise RecipeError(f"{key} with adapter.method {adapter.method}: {name} runs LoRA adapters "
                          "(or use train.sharding: none, DDP)")
    if adapter.rank_per_client is not None:
        raise RecipeError(f"{key} with adapter.rank_per_client: not available "
                          "(or use train.sharding: none, DDP)")
    if fed.parallel_clients > 1:
        raise RecipeError(f"{key} with federation.parallel_clients > 1: the batched clients share "
                          "one unsharded base; set parallel_clients: 1")
    if recipe.eval.humaneval is not None:
        raise RecipeError(f"{key} with eval.humaneval: HumanEval runs after the other ranks have "
                          "left; run it on the saved adapter with `fedtune eval`")
