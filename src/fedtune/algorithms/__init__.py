"""Federated algorithms, one module each, registered by name."""

from __future__ import annotations

from pydantic import ValidationError

from fedtune.algorithms import (  # noqa: F401  (each module registers its algorithms)
    dp_fedavg,
    fedavg,
    fedkseed,
    fedmezo,
    fedopt,
    fedprox,
    flexlora,
    offsite,
    robust,
    scaffold,
)
from fedtune.algorithms.base import (
    AlgorithmSpec,
    ClientUpdate,
    LocalProcedure,
    ModelView,
    Strategy,
    registry,
)
from fedtune.errors import RecipeError

__all__ = [
    "AlgorithmSpec", "ClientUpdate", "LocalProcedure", "Strategy", "available_algorithms",
    "build_local", "build_strategy", "build_view",
]


def available_algorithms() -> list[str]:
    return sorted(registry())


def algorithm_options(name: str, options: dict):
    """Validate `federation.options` against the algorithm's config model."""
    spec = registry()[name]
    try:
        return spec.config.model_validate(options)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = "federation.options." + ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{key}: {msg}")
        allowed = ", ".join(spec.config.model_fields) or "(none)"
        raise RecipeError(f"{'; '.join(lines)} (options of {name}: {allowed})") from None


def build_strategy(name: str, options: dict, n_clients: int = 1) -> Strategy:
    """The server-side strategy of an algorithm for a federation of `n_clients` clients."""
    return registry()[name].build(algorithm_options(name, options), n_clients)


def build_local(name: str, options: dict) -> LocalProcedure:
    """The client-side procedure of an algorithm (plain local training for most)."""
    return registry()[name].local(algorithm_options(name, options))


def check_recipe(recipe) -> None:
    """Raise ValueError where the recipe's other sections do not suit its algorithm."""
    fed = recipe.federation
    spec = registry()[fed.algorithm]
    if spec.check is not None:
        spec.check(algorithm_options(fed.algorithm, fed.options), recipe)


def build_view(name: str, options: dict, slot) -> ModelView:
    """How the algorithm's global state maps onto the model's trainable tensors (see ModelView)."""
    return registry()[name].view(algorithm_options(name, options), slot)
