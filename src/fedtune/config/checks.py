"""Checks that components register for the recipe sections they read.

The schema (schema.py) knows a section's shape; what a value means to the component that uses it
(is `lora` a peft method, are these an algorithm's options, is this a host:port) that component
checks, by registering a function here under a key the schema calls `run_checks` with:

    key                              called with                 registered by
    adapter.method                   (normal name, as written)   fedtune.models.recipe_checks
    adapter                          AdapterSection              fedtune.models.recipe_checks
    algorithm                        name                        fedtune.algorithms.recipe_checks
    federation                       FederationSection           fedtune.algorithms.recipe_checks,
                                                                 fedtune.runtime.recipe_checks
    bench.algorithm                  BenchAlgorithm              fedtune.algorithms.recipe_checks
    recipe                           Recipe                      fedtune.algorithms.recipe_checks
    federation.secure_aggregation    SecureAggregationSection    fedtune.privacy.recipe_checks
    transport.address                address                     fedtune.transport.recipe_checks

A check raises ValueError (pydantic turns it into a recipe error naming file, line and key). The
modules in PROVIDERS are imported on the first check, by name, so this package depends on none of
them; they import no torch. A new component adds its module to PROVIDERS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

PROVIDERS = (
    "fedtune.models.recipe_checks",
    "fedtune.transport.recipe_checks",
    "fedtune.privacy.recipe_checks",
    "fedtune.algorithms.recipe_checks",
    "fedtune.runtime.recipe_checks",
)

_CHECKS: dict[str, list[Callable[..., None]]] = {}
_loaded = False


def register_check(key: str, check: Callable[..., None]) -> None:
    """Run `check` whenever the schema checks `key` (see the table above)."""
    _CHECKS.setdefault(key, []).append(check)


def run_checks(key: str, *values: Any) -> None:
    """Every check registered under `key`, in registration order (ValueError on a bad value)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in PROVIDERS:
            importlib.import_module(module)
    for check in _CHECKS.get(key, ()):
        check(*values)
