"""The bench's results: one VariantResult per run, the local-only mean, and the table written as
results.md, results.csv and printed with rich."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.table import Table

from fedtune.baselines.variants import CENTRALISED, FEDERATED, LOCAL, LOCAL_MEAN
from fedtune.track.report import human_bytes

METRICS = ("loss", "perplexity", "exact_match")
LOCAL_MEAN_NAME = "local-only (mean)"


@dataclass
class VariantResult:
    """What one variant measured. `history` holds the per-round series of its metrics.jsonl:
    `eval` (global test: round, loss, exact_match, ...) and `rounds` (round, train_loss, bytes)."""

    variant: str
    kind: str
    trained_on: list[str]
    global_metrics: dict[str, float]
    per_client: dict[str, dict[str, float]]
    bytes_up: int = 0
    bytes_down: int = 0
    wall_seconds: float = 0.0
    run_dir: str | None = None
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    pfl: dict[str, Any] | None = None   # the run's pFL-Bench figures (summary.json `pfl`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def local_mean(results: list[VariantResult]) -> VariantResult | None:
    """The mean of the local-only runs on the global test set; its client entries are each client's
    own model on its own test part (the personalised local baseline)."""
    local = [r for r in results if r.kind == LOCAL]
    if not local:
        return None
    keys = [k for k in METRICS if all(k in r.global_metrics for r in local)]
    per_client = {r.trained_on[0]: r.per_client[r.trained_on[0]] for r in local
                  if r.trained_on[0] in r.per_client}
    evals = [r.history.get("eval", []) for r in local]
    rounds = sorted(set.intersection(*(set(e["round"] for e in ev) for ev in evals)))
    mean_eval = []
    for rnd in rounds:
        at = [next(e for e in ev if e["round"] == rnd) for ev in evals]
        mean_eval.append({"round": rnd, **{k: _mean([a[k] for a in at]) for k in METRICS
                                          if all(k in a for a in at)}})
    return VariantResult(
        LOCAL_MEAN_NAME, LOCAL_MEAN, [c for r in local for c in r.trained_on],
        {k: _mean([r.global_metrics[k] for r in local]) for k in keys}, per_client,
        wall_seconds=_mean([r.wall_seconds for r in local]), history={"eval": mean_eval},
    )


def primary_metric(results: list[VariantResult]) -> str:
    """exact_match where every variant has it, else loss."""
    return "exact_match" if all("exact_match" in r.global_metrics for r in results) else "loss"


def client_names(results: list[VariantResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [c for c in r.per_client if c not in names]
    return sorted(names)


def csv_rows(results: list[VariantResult]) -> list[dict[str, Any]]:
    """Flat rows (one per variant): the CSV's, and what `fedtune.bench` returns."""
    clients = client_names(results)
    rows = []
    for r in results:
        row: dict[str, Any] = {"variant": r.variant, "kind": r.kind, "trained_on": ";".join(r.trained_on)}
        for k in METRICS:
            row[f"global_{k}"] = r.global_metrics.get(k)
        for c in clients:
            for k in ("loss", "exact_match"):
                row[f"{c}_{k}"] = r.per_client.get(c, {}).get(k)
        row.update(bytes_up=r.bytes_up, bytes_down=r.bytes_down,
                   wall_seconds=round(r.wall_seconds, 3), run_dir=r.run_dir or "")
        rows.append(row)
    return rows


def to_csv(results: list[VariantResult], pfl: list[dict[str, Any]] | None = None) -> str:
    """results.csv; `pfl`: the pFL-Bench rows (pfl_table.pfl_rows), joined by variant as `pfl_*`
    columns (empty for a variant without client figures)."""
    rows = csv_rows(results)
    if pfl:
        by_variant = {r["variant"]: r for r in pfl}
        keys = [k for k in pfl[0] if k != "variant"]
        for row in rows:
            found = by_variant.get(row["variant"], {})
            row.update({f"pfl_{k}": found.get(k) for k in keys})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v)
                         for k, v in row.items()})
    return out.getvalue()


def _fmt(metric: str, value: float | None, compact: bool = False) -> str:
    if value is None:
        return "-"
    if metric == "exact_match":
        return f"{value:.1%}" if compact else f"{value:.1%}".replace("%", " %")
    return f"{value:.3f}" if compact else f"{value:.4f}"


def table_cells(results: list[VariantResult], compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the human table (markdown, HTML; `compact` for the console).

    Per client: the primary metric and, when that is exact match, the loss too (not on the
    console, where the width is short)."""
    clients, metric = client_names(results), primary_metric(results)
    label = "" if compact else " EM" if metric == "exact_match" else " loss"
    per_client = [(c, metric) for c in clients]
    if metric == "exact_match" and not compact:
        per_client = [(c, k) for c in clients for k in (metric, "loss")]
    header = ["variant", "kind", "global loss"]
    if metric == "exact_match":
        header.append("global EM")
    header += [f"{c}{label if k == metric else ' loss'}" for c, k in per_client]
    header += ["bytes up", "bytes down", "wall s"]
    rows = []
    for r in results:
        row = [r.variant, r.kind, _fmt("loss", r.global_metrics.get("loss"), compact)]
        if metric == "exact_match":
            row.append(_fmt(metric, r.global_metrics.get(metric), compact))
        row += [_fmt(k, r.per_client.get(c, {}).get(k), compact) for c, k in per_client]
        row += [human_bytes(r.bytes_up), human_bytes(r.bytes_down), f"{r.wall_seconds:.0f}"]
        rows.append(row)
    return header, rows


# Closer than this counts as a tie: exact match is a fraction of the same test set (equal or
# not); a loss is shown to 4 decimals.
_TIE = {"exact_match": 1e-9, "loss": 5e-5}


def _versus(metric: str, value: float, base: float) -> tuple[str, str]:
    """(difference as text, 'beats' / 'does NOT beat' / 'ties') of `value` against `base`."""
    diff = (f"{(value - base) * 100:+.1f} points" if metric == "exact_match"
            else f"{value - base:+.4f}")
    if abs(value - base) <= _TIE.get(metric, 1e-9):
        return diff, "ties"
    better = value > base if metric == "exact_match" else value < base
    return diff, "beats" if better else "does NOT beat"


def comparison(results: list[VariantResult]) -> list[str]:
    """Sentences: each federated variant against the local-only mean, centralised as reference.

    When the primary metric ties (0.0 % against 0.0 % is common early on), the loss decides."""
    metric = primary_metric(results)
    mean = next((r for r in results if r.kind == LOCAL_MEAN), None)
    central = next((r for r in results if r.kind == CENTRALISED), None)
    lines = []
    for r in results:
        if r.kind != FEDERATED:
            continue
        value = r.global_metrics[metric]
        text = f"{r.variant}: global test {metric} {_fmt(metric, value)}"
        if mean is not None:
            base = mean.global_metrics[metric]
            diff, verdict = _versus(metric, value, base)
            loss, base_loss = r.global_metrics.get("loss"), mean.global_metrics.get("loss")
            if verdict == "ties" and metric != "loss" and loss is not None and base_loss is not None:
                loss_diff, verdict = _versus("loss", loss, base_loss)
                text += (f" vs local-only mean {_fmt(metric, base)} ({diff}: ties); on loss "
                         f"{_fmt('loss', loss)} vs {_fmt('loss', base_loss)} ({loss_diff}: "
                         f"{verdict}{'' if verdict == 'ties' else ' local-only'})")
            else:
                text += (f" vs local-only mean {_fmt(metric, base)} ({diff}: "
                         f"{verdict}{'' if verdict == 'ties' else ' local-only'})")
        if central is not None:
            text += f"; centralised reference {_fmt(metric, central.global_metrics[metric])}"
        lines.append(text)
    return lines


def to_markdown(results: list[VariantResult], *, title: str, budget: str) -> str:
    header, rows = table_cells(results)
    right = {i for i, h in enumerate(header) if i >= 2}
    lines = [f"# {title}", "", f"Budget: {budget}.", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Global columns: the global test set (every client's test part). Client columns "
              "(EM and loss): the variant's final adapter on that client's test part; for the "
              "local-only mean, "
              "each client's own model on its own part. Bytes: adapter traffic of the federation "
              "(none for local-only; centralised pools the raw data instead).", ""]
    lines += [f"- {line}" for line in comparison(results)]
    return "\n".join(lines) + "\n"


def rich_table(results: list[VariantResult], *, title: str) -> Table:
    """The console's table: as results.md less the kind column, with short headers."""
    header, rows = table_cells(results, compact=True)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("variant", no_wrap=True)
    for h in header[2:]:
        table.add_column(h.replace(" ", "\n"), justify="right")
    for r, row in zip(results, rows):
        table.add_row(row[0], *row[2:], style="bold" if r.kind == FEDERATED else None)
    return table
