"""Client figures summarised as pFL-Bench does: per model (global, personal) and client group
(participating, unseen), the example-weighted mean, the standard deviation across clients and the
bottom decile (the value at position ⌊n/10⌋ of the clients sorted worst first)."""

from __future__ import annotations

import math
import statistics
from typing import Any

# Figures where lower is better (the rest, accuracy-like, are better high).
LOWER_BETTER = {"loss", "perplexity", "val_loss", "backdoor_success"}
PERSONAL = "personal_"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def spread(values: list[tuple[float, int]], metric: str) -> dict[str, Any]:
    """(value, weight) per client -> weighted mean, std (population, unweighted), bottom 10 %."""
    total = sum(w for _, w in values)
    plain = [v for v, _ in values]
    mean = (sum(v * w for v, w in values) / total) if total > 0 else statistics.fmean(plain)
    worst_first = sorted(plain, reverse=metric in LOWER_BETTER)
    return {"mean": mean, "std": statistics.pstdev(plain), "bottom_10": worst_first[len(plain) // 10],
            "clients": len(plain)}


def summarise(per_client: dict[str, dict[str, Any]], clients: list[str]) -> dict[str, Any]:
    """{"global": {metric: spread}, "personal": {...}} over `clients` (those that reported)."""
    out: dict[str, Any] = {}
    for model, prefix in (("global", ""), ("personal", PERSONAL)):
        figures: dict[str, list[tuple[float, int]]] = {}
        for client in clients:
            m = per_client.get(client) or {}
            weight = m.get("n_examples")
            weight = weight if isinstance(weight, int) and not isinstance(weight, bool) and weight > 0 else 1
            for key, value in m.items():
                if prefix and not key.startswith(prefix):
                    continue
                if not prefix and key.startswith(PERSONAL):
                    continue
                number = _number(value)
                if number is None or key == "n_examples":
                    continue
                figures.setdefault(key[len(prefix):], []).append((number, weight))
        if figures:
            out[model] = {k: spread(v, k) for k, v in sorted(figures.items())}
    return out


def pfl_summary(per_client: dict[str, dict[str, Any]] | None, holdout: list[str]) -> dict[str, Any] | None:
    """summary.json's `pfl`: participating (and unseen) clients' global and personal figures, and
    the participation gap (unseen − participating mean) where both exist; None without figures."""
    if not per_client:
        return None
    seen = [c for c in sorted(per_client) if c not in holdout]
    unseen = [c for c in sorted(per_client) if c in holdout]
    out: dict[str, Any] = {"participating": summarise(per_client, seen)}
    if unseen:
        out["unseen"] = summarise(per_client, unseen)
        gap: dict[str, Any] = {}
        for model, figures in out["unseen"].items():
            mine = out["participating"].get(model, {})
            gap[model] = {k: v["mean"] - mine[k]["mean"] for k, v in figures.items() if k in mine}
        out["gap"] = gap
    return out if any(out["participating"].values()) or "unseen" in out else None
