"""The run's summary (summary.json) and the closing table printed on the console."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.config import Recipe
from fedtune.transport.base import TrafficCounter

_METRICS = ("loss", "perplexity", "exact_match", "backdoor_success")


def _pick(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metrics:
        return None
    return {k: metrics[k] for k in (*_METRICS, "n_examples") if k in metrics}


def make_summary(recipe: Recipe, result, *, traffic: TrafficCounter, wall_seconds: float,
                 adapter_parameters: int, adapter_bytes: int, run_dir: Path) -> dict[str, Any]:
    t = result.timings
    overhead = max(0.0, wall_seconds - t.train - t.eval)
    return {
        "recipe": recipe.name,
        "algorithm": recipe.federation.algorithm,
        "model": recipe.model.name,
        "adapter": recipe.adapter.method,
        "rounds": result.rounds,
        "clients": recipe.federation.clients,
        "clients_per_round": recipe.federation.per_round(),
        "initial": _pick(result.initial),
        "final": _pick(result.final),
        "per_client": {c: _pick(m) for c, m in sorted(result.clients.items())},
        "bytes_up": traffic.total("up"),
        "bytes_down": traffic.total("down"),
        "rejected_replies": result.rejected,
        "missing_updates": result.missing,
        "strategy": result.strategy_metrics,
        "dp_sgd": _local_dp(getattr(result, "local_dp", None)),
        "adapter_parameters": adapter_parameters,
        "adapter_bytes": adapter_bytes,
        "wall_seconds": round(wall_seconds, 3),
        "train_seconds": round(t.train, 3),
        "eval_seconds": round(t.eval, 3),
        "overhead_seconds": round(overhead, 3),
        "final_adapter": str(Path(run_dir) / "final"),
    }


def _local_dp(per_client: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """Local DP-SGD: each client's (ε, δ) over its rounds, and the largest ε (None: no noise)."""
    if not per_client:
        return None
    eps = [m.get("epsilon") for m in per_client.values()]
    return {"max_epsilon": None if None in eps else max(eps),
            "delta": next(iter(per_client.values())).get("delta"),
            "clients": dict(sorted(per_client.items()))}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _number(value: Any, spec: str) -> str:
    """A finite number formatted by `spec`; "-" for anything else (a value may come from a peer)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    try:
        return format(float(value), spec) if math.isfinite(value) else "-"
    except OverflowError:  # an int beyond float range
        return "-"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15 else ""


def _cells(m: dict[str, Any] | None) -> list[str]:
    if not m:
        return ["-", "-", "-"]
    return [_number(m.get("loss"), ".4f"), _number(m.get("perplexity"), ".2f"),
            _number(m.get("exact_match"), ".1%")]


def closing_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['recipe']}: {summary['algorithm']} + {summary['adapter']}, "
                        f"{summary['rounds']} rounds, {summary['clients']} clients")
    for col in ("evaluated on", "model", "loss", "perplexity", "exact match", "examples"):
        table.add_column(col, justify="left" if col in ("evaluated on", "model") else "right")
    if summary.get("initial"):
        init = summary["initial"]
        table.add_row("global test", "base", *_cells(init), str(init.get("n_examples", "")))
    offsite = summary.get("offsite")  # the full model with the plugged-in layers; clients hold the emulator
    final_label, client_label = ("plugged-in", "emulator") if offsite else ("federated", "federated")
    if summary.get("final"):
        fin = summary["final"]
        table.add_row("global test", final_label, *_cells(fin), str(fin.get("n_examples", "")),
                      style="bold")
        if offsite and offsite.get("emulator_final"):
            table.add_row("global test", "emulator", *_cells(offsite["emulator_final"]),
                          str(fin.get("n_examples", "")))
    for client, m in summary.get("per_client", {}).items():
        table.add_row(f"{client} test", client_label, *_cells(m), _count((m or {}).get("n_examples")))
    table.caption = (
        f"sent down {human_bytes(summary['bytes_down'])}, up {human_bytes(summary['bytes_up'])}; "
        f"adapter {summary['adapter_parameters']:,} parameters ({human_bytes(summary['adapter_bytes'])}); "
        f"{summary['wall_seconds']:.0f} s wall, {summary['train_seconds']:.0f} s training, "
        f"{summary['eval_seconds']:.0f} s evaluation"
    )
    return table
