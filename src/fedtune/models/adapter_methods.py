"""Which adapter methods fedtune runs, the defaults it gives them, and those it refuses (no torch import).

The recipe check (`adapter.method`, at load time) and `models.adapters` (at build time) both read
these tables, so a method is either refused before any work or built with documented defaults.
"""

from __future__ import annotations

import importlib.util
from typing import Any

# Prompt-based methods: how many virtual tokens when `adapter.options` does not say
# (the value peft's own examples use; docs/recipes.md, "Adapter methods").
DEFAULT_VIRTUAL_TOKENS = 20
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "cartridge")

# adaption_prompt (LLaMA-Adapter): prompt length, and adapter layers = every decoder layer.
DEFAULT_ADAPTER_LEN = 10

# Methods fedtune cannot run as it stands, and why (what to use instead).
REFUSED: dict[str, str] = {
    "adalora": (
        "AdaLoRA prunes ranks by importance scores that each model accumulates over a global "
        "step schedule (update_and_allocate); fedtune does not run that schedule across clients, "
        "so it would be plain LoRA under another name. Use `lora`, or `federation.algorithm: "
        "flexlora` for clients of different ranks"
    ),
    "multitask_prompt_tuning": (
        "multi-task prompt tuning needs a task id with every example (forward(task_ids=...)), "
        "which fedtune's data has not; use `prompt_tuning`"
    ),
    "poly": (
        "Polytropon needs a task id with every example (forward(task_ids=...)), which fedtune's "
        "data has not; use `lora`"
    ),
    "xlora": (
        "X-LoRA mixes already trained LoRA adapters (options.adapters); it does not train an "
        "adapter of its own from scratch; train a `lora` adapter instead"
    ),
}

# Methods that need a package fedtune does not depend on: method -> (module, pip name).
NEEDS_PACKAGE: dict[str, tuple[str, str]] = {"adamss": ("sklearn", "scikit-learn")}

# Methods that need an option with no sensible default: method -> (option, what it is).
NEEDS_OPTION: dict[str, tuple[str, str]] = {
    "trainable_tokens": ("token_indices", "the ids of the token embeddings to train, e.g. [32000, 32001]"),
}


def check_method(method: str, options: dict[str, Any]) -> None:
    """Raise ValueError (the recipe's message) if `method` with `options` cannot run."""
    if method in REFUSED:
        raise ValueError(f"{method!r} is not supported: {REFUSED[method]}")
    if method in NEEDS_PACKAGE:
        module, package = NEEDS_PACKAGE[method]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{method!r} needs the {package} package: pip install {package}")
    if method in NEEDS_OPTION:
        option, what = NEEDS_OPTION[method]
        if option not in options:
            raise ValueError(f"{method!r} needs adapter.options.{option}: {what}")
