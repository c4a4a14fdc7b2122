"""What the algorithms check in a recipe: the algorithm is registered, its options fit its model,
the rest of the recipe suits it (its own `check`), and secure aggregation only where the
algorithm needs just the sum (registered with fedtune.config.checks; no torch)."""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.catalog import (
    CATALOG,
    algorithm_options,
    available_algorithms,
    check_recipe,
)
from fedtune.config.checks import register_check
from fedtune.errors import RecipeError


def known_algorithm(name: str) -> None:
    """`name` is registered (the message lists those that are)."""
    if name not in available_algorithms():
        raise ValueError(f"unknown algorithm {name!r}; allowed: {', '.join(available_algorithms())}")


def federation_options(fed: Any) -> None:
    try:
        algorithm_options(fed.algorithm, fed.options)
    except RecipeError as exc:
        raise ValueError(str(exc)) from None


def secure_aggregation(fed: Any) -> None:
    """Refuse what cannot work with secure aggregation: the server sees only the sum."""
    if not fed.secure_aggregation.enabled:
        return
    from fedtune.privacy.fixedpoint import codec_of
    from fedtune.privacy.secagg_params import check_threshold

    key = "secure_aggregation"
    if not CATALOG[fed.algorithm].sum_only:
        works = ", ".join(sorted(n for n, s in CATALOG.items() if s.sum_only))
        raise ValueError(
            f"{key}.enabled: algorithm {fed.algorithm!r} needs each client's own update (or "
            f"per-client tensors) on the server, which secure aggregation hides; it works with "
            f"algorithms that use only the sum of the updates: {works}")
    if fed.compression.up.method != "none":
        raise ValueError(
            f"{key}.enabled: compression.up must be 'none' (masked inputs are 64-bit integers "
            f"that no codec can shrink); got {fed.compression.up.method!r}")
    if fed.attack.kind in ("nan", "inf"):
        raise ValueError(
            f"{key}.enabled: attack.kind {fed.attack.kind!r} is a server-side detection "
            "experiment; with secure aggregation the server sees no individual update")
    n = fed.per_round()
    if n < 2:
        raise ValueError(f"{key}.enabled: needs at least 2 clients per round, got {n}")
    try:
        check_threshold(fed.secure_aggregation.threshold_for(n), n)
        codec_of(fed.secure_aggregation).check_capacity(n)
    except RecipeError as exc:
        raise ValueError(f"{key}: {str(exc).replace('secagg ', '')}") from None


def rank_per_client(recipe: Any) -> None:
    """adapter.rank_per_client: LoRA, ranks up to adapter.r, one per client, an algorithm that
    aggregates mixed ranks, no secure aggregation (the clients' updates differ in shape)."""
    spec = recipe.adapter.rank_per_client
    if spec is None:
        return
    key, fed = "adapter.rank_per_client", recipe.federation
    if recipe.adapter.method != "lora":
        raise ValueError(f"{key}: needs adapter.method lora, got {recipe.adapter.method!r}")
    ranks = list(spec) if isinstance(spec, list) else list(spec.ranks)
    if max(ranks) > recipe.adapter.r:
        raise ValueError(f"{key}: rank {max(ranks)} is above adapter.r={recipe.adapter.r} (the model "
                         "is built at adapter.r, the largest rank)")
    if isinstance(spec, list) and len(spec) != fed.clients:
        raise ValueError(f"{key}: {len(spec)} ranks for federation.clients={fed.clients}")
    if not isinstance(spec, list) and spec.resources is not None and len(spec.resources) != fed.clients:
        raise ValueError(f"{key}.resources: {len(spec.resources)} entries for "
                         f"federation.clients={fed.clients}")
    if not CATALOG[fed.algorithm].mixed_ranks:
        works = ", ".join(sorted(n for n, s in CATALOG.items() if s.mixed_ranks))
        raise ValueError(f"{key}: federation.algorithm {fed.algorithm!r} cannot aggregate LoRA "
                         f"factors of different ranks; use one of: {works}")
    if fed.secure_aggregation.enabled:
        raise ValueError(f"{key}: secure aggregation needs every update of one shape; the clients' "
                         "ranks differ")


def bench_options(entry: Any) -> None:
    try:
        algorithm_options(entry.name, entry.options)
    except RecipeError as exc:
        raise ValueError(str(exc).replace("federation.options.", "options.")) from None


register_check("algorithm", known_algorithm)
register_check("federation", federation_options)
register_check("federation", secure_aggregation)
register_check("bench.algorithm", bench_options)
register_check("recipe", check_recipe)
register_check("recipe", rank_per_client)
