"""Checks of every plain value a peer sends (counts, metrics, rates, flags): type and range, or MessageError.

Server and client use these before a value from the other side reaches arithmetic, a log line,
metrics.jsonl, a checkpoint or the closing table, so a hostile value rejects its message only.
"""

from __future__ import annotations

import math
from typing import Any

from fedtune.errors import MessageError

MAX_METRICS = 64            # entries in one message's metrics
MAX_KEY_CHARS = 64          # characters of a metric name
MAX_TEXT_CHARS = 200        # characters of a text metric (e.g. "attack": "scale")
MAX_ABS_NUMBER = 1e30       # above any real metric (a perplexity reaches e^50 ≈ 5e21); sums stay finite
MAX_LR = 100.0              # the most a server may ask as a local learning rate
MAX_ERROR_CHARS = 300       # of a peer's error text kept in logs

Metrics = dict[str, float | int | str | None]

# Metrics the receiving side uses in arithmetic: (low, high) bounds; None means unbounded.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "train_seconds": (0.0, None),
    "steps": (0.0, None),
    "examples_seen": (0.0, None),
    "dp_epsilon": (0.0, None),
    "dp_delta": (0.0, 1.0),
    "loss": (None, None),
    "perplexity": (0.0, None),
    "exact_match": (0.0, 1.0),
    "n_examples": (0.0, None),
    "n_generated": (0.0, None),
}
# Metrics that must be numbers when present (None allowed only where the producer may send it).
_NUMERIC = {"train_loss", "lr", *_RANGES}
_NULLABLE = {"dp_epsilon", "dp_delta"}


def is_number(value: Any) -> bool:
    """A real int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_number(value: Any, what: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite int or float within [low, high] and |x| <= MAX_ABS_NUMBER, as a float."""
    if not is_number(value):
        raise MessageError(f"{what} must be a number, got {type(value).__name__}")
    if isinstance(value, int) and abs(value) > MAX_ABS_NUMBER:  # before float(): 10**400 overflows
        raise MessageError(f"{what} is out of range (|x| > {MAX_ABS_NUMBER:g})")
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_ABS_NUMBER:
        raise MessageError(f"{what} must be finite with |x| <= {MAX_ABS_NUMBER:g}, got {number!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise MessageError(f"{what} must be in [{low}, {high}], got {number!r}")
    return number


def count(value: Any, what: str, *, low: int = 0, high: int) -> int:
    """An int (not a bool) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise MessageError(f"{what} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        shown = str(value) if abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"
        raise MessageError(f"{what} must be in [{low}, {high}], got {shown}")
    return value


def short_text(value: Any, what: str, *, limit: int = MAX_TEXT_CHARS) -> str:
    """A printable string of at most `limit` characters."""
    if not isinstance(value, str):
        raise MessageError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit or not value.isprintable():
        raise MessageError(f"{what} must be printable text of at most {limit} characters")
    return value


def flag(value: Any, what: str) -> bool:
    """A JSON true/false."""
    if not isinstance(value, bool):
        raise MessageError(f"{what} must be true or false, got {type(value).__name__}")
    return value


def error_text(value: Any) -> str:
    """A peer's error description, shortened and made printable for a log line."""
    text = value if isinstance(value, str) else repr(value)[:80]
    return "".join(ch if ch.isprintable() else "?" for ch in text[:MAX_ERROR_CHARS])


def metric_value(key: str, value: Any, what: str) -> float | int | str | None:
    """One metric: a finite number in its range, a short text, or null (where allowed)."""
    where = f"{what}.{key}"
    if value is None:
        if key in _NUMERIC and key not in _NULLABLE:
            raise MessageError(f"{where} must be a number, got null")
        return None
    if key in _NUMERIC or is_number(value):
        low, high = _RANGES.get(key, (None, None))
        number = finite_number(value, where, low=low, high=high)
        return value if isinstance(value, int) else number
    if isinstance(value, str):
        return short_text(value, where)
    raise MessageError(f"{where} must be a number, a short text or null, got {type(value).__name__}")


def metrics(value: Any, what: str = "meta.metrics") -> Metrics:
    """A peer's metrics: at most MAX_METRICS entries with short printable names, each checked."""
    if not isinstance(value, dict):
        raise MessageError(f"{what} must be an object, got {type(value).__name__}")
    if len(value) > MAX_METRICS:
        raise MessageError(f"{what} has {len(value)} entries, more than {MAX_METRICS}")
    out: Metrics = {}
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
            raise MessageError(f"{what}: a name must be printable text of 1..{MAX_KEY_CHARS} characters")
        out[key] = metric_value(key, item, what)
    return out


def learning_rate(value: Any, what: str = "meta.lr") -> float:
    """A local learning rate the server asks for: finite, in (0, MAX_LR]."""
    rate = finite_number(value, what, low=0.0, high=MAX_LR)
    if rate <= 0:
        raise MessageError(f"{what} must be > 0, got {rate!r}")
    return rate


def stored_count(value: Any, default: int = 0) -> int:
    """A counter read back from a checkpoint: a non-negative int, or `default` if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**62:
        return value
    return default


def stored_seconds(value: Any, default: float = 0.0) -> float:
    """Seconds read back from a checkpoint: a finite float >= 0, or `default` if they are not."""
    if is_number(value) and not (isinstance(value, int) and value > 2**62):
        number = float(value)
        if math.isfinite(number) and number >= 0:
            return number
    return default
