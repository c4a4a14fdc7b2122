"""Secure aggregation's threshold rule, checked without torch (a recipe is checked with it)."""

from __future__ import annotations

from fedtune.errors import RecipeError


def check_threshold(threshold: int, n_peers: int) -> None:
    """Refuse (RecipeError) a threshold that is not a majority of the configured clients."""
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise RecipeError(f"secagg threshold must be an int, got {threshold!r}")
    if not (threshold >= 2 and 2 * threshold > n_peers and threshold <= n_peers):
        raise RecipeError(
            f"secagg threshold {threshold} of {n_peers} clients is not allowed: it must be "
            f"at least 2 and more than half the clients ({n_peers // 2 + 1}..{n_peers})"
        )
