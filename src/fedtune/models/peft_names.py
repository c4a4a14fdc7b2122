"""The names of peft's adapter methods (`adapter.method`), read without importing peft or torch."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path


@cache
def peft_method_names() -> tuple[str, ...]:
    """peft's `PeftType` members, lower case (`lora`, `ia3`, `prefix_tuning`, ...).

    A recipe names its adapter method when it loads; importing peft for that would import torch
    and transformers (seconds). peft defines the enum in `peft/utils/peft_types.py`, a module that
    needs only the standard library, so it is run on its own; where peft has another layout (or
    is loaded already) the enum comes from peft itself.
    """
    if "peft" not in sys.modules:
        enum = _standalone_peft_type()
        if enum is not None:
            return tuple(sorted(t.lower() for t in enum.__members__))
    from peft import PeftType

    return tuple(sorted(t.lower() for t in PeftType.__members__))


def _standalone_peft_type():
    spec = importlib.util.find_spec("peft")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "utils" / "peft_types.py"
        if not path.is_file():
            continue
        module_spec = importlib.util.spec_from_file_location("_fedtune_peft_types", path)
        if module_spec is None or module_spec.loader is None:
            continue
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception:  # the file needs more than the standard library: import peft instead
            return None
        return getattr(module, "PeftType", None)
    return None
