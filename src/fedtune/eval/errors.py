"""The error evaluation suites raise, and the check for their optional packages."""

from __future__ import annotations

import importlib
from types import ModuleType

from fedtune.errors import FedtuneError

INSTALL_HINT = "pip install 'fedtune[eval]'"


class EvalError(FedtuneError):
    """An evaluation suite cannot run: a missing optional package, an unknown metric or problem."""


def require_module(module: str, package: str, purpose: str) -> ModuleType:
    """Import `module` or raise EvalError saying which package provides it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvalError(
            f"{purpose} needs the `{package}` package, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from None
