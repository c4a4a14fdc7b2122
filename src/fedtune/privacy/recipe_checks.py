"""What secure aggregation checks in a recipe: its fixed-point codec settings fit (registered with
fedtune.config.checks; the codec, and numpy, load only when they are checked)."""

from __future__ import annotations

from typing import Any

from fedtune.config.checks import register_check
from fedtune.errors import RecipeError


def secure_codec(section: Any) -> None:
    from fedtune.privacy.fixedpoint import codec_of

    try:
        codec_of(section)
    except RecipeError as exc:
        raise ValueError(str(exc).replace("secagg ", "")) from None


register_check("federation.secure_aggregation", secure_codec)
