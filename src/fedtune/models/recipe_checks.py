"""What the model code checks in a recipe: the adapter method is one peft or fedtune provides,
and one this fedtune can run (registered with fedtune.config.checks; no torch or peft import)."""

from __future__ import annotations

from typing import Any

from fedtune.config.checks import register_check
from fedtune.config.schema import FEDTUNE_METHODS


def known_method(name: str, written: str) -> None:
    from fedtune.models.peft_names import peft_method_names

    allowed = sorted([*peft_method_names(), *FEDTUNE_METHODS])
    if name not in allowed:
        raise ValueError(f"unknown peft method {written!r}; allowed: {', '.join(allowed)}")


def runnable(section: Any) -> None:
    from fedtune.models.adapter_methods import check_method

    check_method(section.method, section.options)


register_check("adapter.method", known_method)
register_check("adapter", runnable)
