"""What a multi-process launch (torchrun / accelerate: train/distributed.py) refuses before any
work, and what it runs unsplit: DP-SGD, and what the algorithm's catalog row says of itself."""

from __future__ import annotations

import logging

from fedtune.algorithms.catalog import CATALOG
from fedtune.config import Recipe
from fedtune.errors import RecipeError
from fedtune.train.distributed import ranks

log = logging.getLogger("fedtune.distributed")


def check_launch(recipe: Recipe) -> None:
    """Refuse, before any work, what cannot run on several ranks; say once what runs unsplit."""
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
