"""The run's summary (summary.json) and the closing table printed on the console."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.config import Recipe
from fedtune.track.pfl import PERSONAL, pfl_summary
from fedtune.track.traffic import TrafficCounter

# Figures kept in summary.json, in the closing table's column order (generation metrics by name).
_METRICS = ("loss", "perplexity", "val_loss", "exact_match", "gsm8k", "rouge_l", "mc_accuracy",
            "backdoor_success")
_LABELS = {"loss": "loss", "perplexity": "perplexity", "val_loss": "val loss",
           "exact_match": "exact match", "gsm8k": "GSM8K acc", "rouge_l": "Rouge-L",
           "mc_accuracy": "MC acc", "backdoor_success": "backdoor"}
# peft methods whose untrained adapter is randomly initialised virtual tokens in front of the input
_PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning", "multitask_prompt_tuning", "cpt")


def _pick(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metrics:
        return None
    keys = (*_METRICS, *(PERSONAL + k for k in _METRICS), "n_examples")  # and the personal model's
    return {k: metrics[k] for k in keys if k in metrics}


def make_summary(recipe: Recipe, result, *, traffic: TrafficCounter, wall_seconds: float,
                 adapter_parameters: int, adapter_bytes: int, run_dir: Path) -> dict[str, Any]:
    t = result.timings
    overhead = max(0.0, wall_seconds - t.train - t.eval)
    per_client = {c: _pick(m) for c, m in sorted(result.clients.items())}
    holdout = recipe.federation.holdout_names()
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
        "per_client": per_client,
        "holdout_clients": holdout,
        "pfl": pfl_summary(per_client, holdout),   # pFL-Bench figures (track/pfl.py)
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


def _cell(key: str, value: Any) -> str:
    """One figure of the closing table; "-" for anything but a finite number (values may come
    from peers)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return "-"
    if not math.isfinite(value):
        return "-"
    if key in ("loss", "val_loss"):
        return f"{value:.4f}"
    if key in ("perplexity", "rouge_l"):
        return f"{value:.2f}" if key == "perplexity" else f"{value:.3f}"
    return f"{value:.1%}"


def _columns(summary: dict[str, Any]) -> list[str]:
    """The figures some row has (loss and perplexity always), in _METRICS order."""
    rows = [summary.get("initial"), summary.get("final"), *summary.get("per_client", {}).values(),
            *(row.get("metrics") for row in _report(summary)["rows"])]
    present = {k for m in rows if isinstance(m, dict) for k in m}
    return [k for k in _METRICS if k in ("loss", "perplexity") or k in present]


def _report(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `report` (Party.report: labels and extra rows), checked, with defaults."""
    report = summary.get("report")
    report = report if isinstance(report, dict) else {}
    labels = report.get("labels") if isinstance(report.get("labels"), dict) else {}
    rows = [row for row in report.get("rows") or [] if isinstance(row, dict)
            and isinstance(row.get("metrics"), dict)]
    return {"labels": {k: str(v) for k, v in labels.items()},
            "rows": [{"evaluated_on": str(row.get("evaluated_on", "")), "model": str(row.get("model", "")),
                      "metrics": row["metrics"], "examples": row.get("examples", "")} for row in rows]}


def _caption_dp(summary: dict[str, Any]) -> str:
    """The differential-privacy guarantee, when the run had one (server DP or local DP-SGD)."""
    parts = []
    strategy = summary.get("strategy") or {}
    if "epsilon" in strategy:
        eps = strategy["epsilon"]
        eps_text = f"{eps:.2f}" if isinstance(eps, (int, float)) else "∞ (no noise)"
        parts.append(f"DP (server): ε = {eps_text}, δ = {strategy.get('delta')}")
    local = summary.get("dp_sgd") or {}
    if local:
        eps = local.get("max_epsilon")
        eps_text = f"{eps:.2f}" if isinstance(eps, (int, float)) else "∞ (no noise)"
        parts.append(f"DP-SGD (clients): ε ≤ {eps_text}, δ = {local.get('delta')}")
    return "; ".join(parts)


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15 else ""


def _pfl_rows(table: Table, pfl: Any, cells: Any) -> None:
    """pFL-Bench's client summary: weighted mean, std and bottom 10 % per group and model."""
    if not isinstance(pfl, dict):
        return
    participating = pfl.get("participating")
    if "unseen" not in pfl and not (isinstance(participating, dict) and "personal" in participating):
        return  # no personal model, no unseen client: the standard table (summary.json has them)
    stats = (("mean", "weighted mean"), ("std", "std"), ("bottom_10", "bottom 10 %"))
    for group in ("participating", "unseen"):
        models = pfl.get(group)
        if not isinstance(models, dict):
            continue
        for model, figures in models.items():
            if not isinstance(figures, dict):
                continue
            shown = "adapted" if group == "unseen" and model == "personal" else model
            for key, label in stats:
                row = {m: f.get(key) for m, f in figures.items() if isinstance(f, dict)}
                table.add_row(f"{group} clients: {label}", shown, *cells(row), "")


def closing_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['recipe']}: {summary['algorithm']} + {summary['adapter']}, "
                        f"{summary['rounds']} rounds, {summary['clients']} clients")
    columns = _columns(summary)
    table.add_column("evaluated on")
    table.add_column("model")
    for key in (*columns, "examples"):
        table.add_column(_LABELS.get(key, key), justify="right")

    def _cells(m: dict[str, Any] | None) -> list[str]:
        return [_cell(k, (m or {}).get(k)) for k in columns]

    if summary.get("initial"):
        init = summary["initial"]
        base = ("base + random virtual tokens" if summary.get("adapter") in _PROMPT_METHODS else "base")
        table.add_row("global test", base, *_cells(init), str(init.get("n_examples", "")))
    report = _report(summary)  # what the algorithm's models are called, its extra rows
    final_label = report["labels"].get("final", "federated")
    client_label = report["labels"].get("clients", "federated")
    if summary.get("final"):
        fin = summary["final"]
        table.add_row("global test", final_label, *_cells(fin), str(fin.get("n_examples", "")),
                      style="bold")
        for row in report["rows"]:
            table.add_row(row["evaluated_on"], row["model"], *_cells(row["metrics"]),
                          str(row["examples"]))
    holdout = set(summary.get("holdout_clients") or [])
    for client, m in summary.get("per_client", {}).items():
        unseen = " (unseen)" if client in holdout else ""
        table.add_row(f"{client} test{unseen}", client_label, *_cells(m), _count((m or {}).get("n_examples")))
        personal = {k[len(PERSONAL):]: v for k, v in (m or {}).items() if k.startswith(PERSONAL)}
        if personal:
            table.add_row(f"{client} test{unseen}", "adapted" if unseen else "personal", *_cells(personal), "")
    _pfl_rows(table, summary.get("pfl"), _cells)
    table.caption = (
        f"sent down {human_bytes(summary['bytes_down'])}, up {human_bytes(summary['bytes_up'])}; "
        f"adapter {summary['adapter_parameters']:,} parameters ({human_bytes(summary['adapter_bytes'])}); "
        f"{summary['wall_seconds']:.0f} s wall, {summary['train_seconds']:.0f} s training, "
        f"{summary['eval_seconds']:.0f} s evaluation"
    )
    extra = [_caption_dp(summary)]
    best = summary.get("best")
    if isinstance(best, dict) and best.get("round") is not None:
        extra.append(f"best by {best['metric']}: round {best['round']} ({best['value']:.4f}) in best/")
    early = summary.get("early_stopping")
    if isinstance(early, dict) and summary.get("stopped_early"):
        extra.append(f"stopped early at round {early['stopped_at']} ({early['metric']} not better "
                     f"than {early['best_value']:.4f} of round {early['best_round']} "
                     f"for {early['patience']} evaluations)")
    table.caption += "".join(f"\n{line}" for line in extra if line)
    return table
