"""Federated algorithms, one module each, listed by name in `catalog.py`.

Importing this package (and checking a recipe's algorithm and options) needs no torch; the
implementations load on first use of `registry`, `build_strategy`, `build_local` or `build_view`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedtune.algorithms.catalog import algorithm_options, available_algorithms, check_recipe

if TYPE_CHECKING:
    from fedtune.algorithms.base import AlgorithmSpec, LocalProcedure, ModelView, Strategy
    from fedtune.algorithms.party import Party

__all__ = [
    "AlgorithmSpec", "ClientUpdate", "LocalProcedure", "Strategy", "algorithm_options",
    "available_algorithms", "build_local", "build_party", "build_strategy", "build_view", "check_recipe",
    "registry",
]

_FROM_BASE = {"AlgorithmSpec", "ClientUpdate", "LocalProcedure", "ModelView", "Strategy"}


def registry() -> dict[str, AlgorithmSpec]:
    """Name -> implementation of every algorithm (imports them, and torch)."""
    from fedtune.algorithms.base import registry as full_registry

    return full_registry()


def build_strategy(name: str, options: dict, n_clients: int | None = None) -> Strategy:
    """The server-side strategy of an algorithm; those whose rule depends on the federation's
    size (SCAFFOLD's control-variate mean, DP-FedAvg's sampling rate) need `n_clients`."""
    spec = registry()[name]
    config = algorithm_options(name, options)
    if not spec.needs_clients:
        return spec.build(config)
    if n_clients is None or n_clients < 1:
        raise ValueError(f"the {name} strategy needs the number of clients in the federation")
    return spec.build(config, n_clients)


def build_local(name: str, options: dict) -> LocalProcedure:
    """The client-side procedure of an algorithm (plain local training for most)."""
    return registry()[name].local(algorithm_options(name, options))


def build_party(name: str, options: dict, recipe: Any) -> Party:
    """The algorithm's hooks for one process's set-up and end (see algorithms/party.py)."""
    return registry()[name].party(algorithm_options(name, options), recipe)


def build_view(name: str, options: dict, slot) -> ModelView:
    """How the algorithm's global state maps onto the model's trainable tensors (see ModelView)."""
    return registry()[name].view(algorithm_options(name, options), slot)


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:  # the torch-side types, on demand
        from fedtune.algorithms import base

        return getattr(base, name)
    raise AttributeError(f"module 'fedtune.algorithms' has no attribute {name!r}")
