"""Model selection over a run's evaluations: the pooled validation loss of the clients, the best
global adapter by a chosen metric (`output.keep_best`), and early stopping (`eval.early_stopping`).

All of it is plain data that goes into the checkpoint, so a resumed run selects and stops exactly
as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.config import EarlyStoppingSection

State = dict[str, torch.Tensor]
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "val_loss"})
MAX_TOKENS = 2**40  # far beyond any validation part; a larger count from a client is refused


def pooled_val_loss(reports: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The validation loss per token over all clients' validation parts, from each client's
    `val_loss` (mean per token) and `val_tokens`. Returns the figures and the clients whose
    values were refused (not numbers, negative, not finite, a token count out of range)."""
    total, tokens, used, bad = 0.0, 0, 0, []
    for client, values in sorted(reports.items()):
        if "val_loss" not in values and "val_tokens" not in values:
            continue
        loss, n = values.get("val_loss"), values.get("val_tokens")
        ok_loss = isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss) and loss >= 0
        ok_n = isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_TOKENS
        if not (ok_loss and ok_n):
            bad.append(client)
            continue
        total += float(loss) * n
        tokens += n
        used += 1
    if tokens == 0:
        return {}, bad
    return {"val_loss": total / tokens, "val_clients": used, "val_tokens": tokens}, bad


def better(metric: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` by more than `min_delta` (lower is better for losses)."""
    if best is None:
        return True
    return value < best - min_delta if metric in LOWER_IS_BETTER else value > best + min_delta


def _value(metrics: dict[str, Any], metric: str) -> float | None:
    value = metrics.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class Selection:
    """What the run has seen so far: the best evaluation by `keep_best` (with a copy of that global
    adapter) and the early-stopping watch (its best value and evaluations without improvement)."""

    keep_best: str | None = None
    early: EarlyStoppingSection | None = None
    best_round: int | None = None
    best_value: float | None = None
    best_state: State | None = None
    stop_best: float | None = None
    stop_round: int | None = None
    stale: int = 0
    stopped_at: int | None = None

    def observe(self, round_: int, metrics: dict[str, Any], state: State) -> bool:
        """Take one evaluation of the global adapter `state`; True when training should stop."""
        if self.keep_best is not None:
            value = _value(metrics, self.keep_best)
            if value is not None and better(self.keep_best, value, self.best_value):
                self.best_round, self.best_value = round_, value
                self.best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        if self.early is None:
            return False
        value = _value(metrics, self.early.metric)
        if value is None:  # not measured in this evaluation: neither better nor worse
            return False
        if better(self.early.metric, value, self.stop_best, self.early.min_delta):
            self.stop_best, self.stop_round, self.stale = value, round_, 0
            return False
        self.stale += 1
        if self.stale >= self.early.patience:
            self.stopped_at = round_
            return True
        return False

    def may_stop(self) -> bool:
        """Whether the next evaluation stops training unless it improves (so it may be the last)."""
        if self.early is None or self.stop_best is None:  # the first evaluation always improves
            return False
        return self.stale + 1 >= self.early.patience

    def state(self) -> dict[str, Any]:
        """For the checkpoint (JSON); the best adapter's tensors travel separately."""
        return {"best_round": self.best_round, "best_value": self.best_value,
                "stop_best": self.stop_best, "stop_round": self.stop_round, "stale": self.stale,
                "stopped_at": self.stopped_at}

    def load(self, info: dict[str, Any], best_state: State) -> None:
        self.best_round, self.best_value = info.get("best_round"), info.get("best_value")
        self.stop_best, self.stop_round = info.get("stop_best"), info.get("stop_round")
        self.stale = int(info.get("stale", 0))
        self.stopped_at = info.get("stopped_at")
        self.best_state = dict(best_state) if best_state else None

    def summary(self) -> dict[str, Any]:
        """summary.json's `best` and `early_stopping` entries (None when not asked for)."""
        out: dict[str, Any] = {"best": None, "early_stopping": None}
        if self.keep_best is not None:
            out["best"] = {"metric": self.keep_best, "round": self.best_round, "value": self.best_value}
        if self.early is not None:
            out["early_stopping"] = {
                "metric": self.early.metric, "patience": self.early.patience,
                "min_delta": self.early.min_delta, "best_round": self.stop_round,
                "best_value": self.stop_best, "stopped_at": self.stopped_at}
        return out
