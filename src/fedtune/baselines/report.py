"""The bench's HTML report: PNG plots (matplotlib, Agg, no display) embedded in one self-contained
page that opens in a browser with no server; the plotted series are also saved as plots.json."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedtune.baselines.results import (
    VariantResult,
    client_names,
    comparison,
    primary_metric,
    table_cells,
)
from fedtune.baselines.variants import CENTRALISED, FEDERATED, LOCAL, LOCAL_MEAN

Series = dict[str, dict[str, list[float]]]  # label -> {"x": [...], "y": [...]}

PLOTS = {
    "loss": "Loss per round",
    "accuracy": "Exact match on the global test set per round",
    "per_client": "Per-client results of the final adapters",
    "bytes": "Bytes per round (federated variants)",
}


def _line(history: list[dict[str, Any]], key: str) -> dict[str, list[float]] | None:
    points = [(h["round"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
    if not points:
        return None
    return {"x": [p[0] for p in points], "y": [float(p[1]) for p in points]}


def plot_series(results: list[VariantResult]) -> dict[str, Any]:
    """Every series the plots draw, by plot and panel; the figures are drawn from this only."""
    metric = primary_metric(results)
    series: dict[str, Any] = {"global_loss": {}, "train_loss": {}, "global_exact_match": {},
                              "bytes_up": {}, "bytes_down": {}}
    for r in results:
        evals, rounds = r.history.get("eval", []), r.history.get("rounds", [])
        for name, hist, key in (("global_loss", evals, "loss"), ("train_loss", rounds, "train_loss"),
                                ("global_exact_match", evals, "exact_match")):
            line = _line(hist, key)
            if line is not None:
                series[name][r.variant] = line
        if r.kind == FEDERATED:
            for key in ("bytes_up", "bytes_down"):
                line = _line(rounds, key)
                if line is not None:
                    series[key][r.variant] = line
    clients = client_names(results)

    def bars(key: str) -> dict[str, list[float | None]]:
        return {r.variant: [r.per_client.get(c, {}).get(key) for c in clients]
                + [r.global_metrics.get(key)] for r in results}

    # The primary metric's bars and, beside them, the loss's (an all-zero exact match still
    # shows how the variants differ).
    series["per_client"] = {"metric": metric, "groups": [*clients, "global"], "bars": bars(metric),
                            "loss_bars": bars("loss") if metric != "loss" else {}}
    return series


def _style(kind: str) -> dict[str, Any]:
    if kind == LOCAL:
        return {"linestyle": ":", "linewidth": 1.0, "alpha": 0.8}
    if kind == LOCAL_MEAN:
        return {"linestyle": "--", "linewidth": 1.8}
    if kind == CENTRALISED:
        return {"linestyle": "-.", "linewidth": 1.8}
    return {"linestyle": "-", "linewidth": 2.2, "marker": "o", "markersize": 3}


def _colours(kinds: dict[str, str]) -> dict[str, str]:
    """One colour per variant, the same in every plot; centralised (the reference) in black."""
    colours, i = {}, 0
    for label, kind in kinds.items():
        if kind == CENTRALISED:
            colours[label] = "black"
        else:
            colours[label], i = f"C{i % 10}", i + 1
    return colours


def _rounds_axis(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _lines(ax, lines: Series, kinds: dict[str, str], title: str, ylabel: str) -> None:
    colours = _colours(kinds)
    for label, line in lines.items():
        ax.plot(line["x"], line["y"], label=label, color=colours.get(label),
                **_style(kinds.get(label, FEDERATED)))
    _rounds_axis(ax, title, ylabel)
    if lines:
        ax.legend(fontsize=7)


def _bars(ax, groups: list[str], bars: dict[str, list[float | None]], metric: str,
          kinds: dict[str, str]) -> None:
    width, colours = 0.8 / max(1, len(bars)), _colours(kinds)
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else float("nan") for v in values], width, label=label,
               color=colours.get(label))
    name = metric.replace("_", " ")
    if metric == "exact_match":
        ax.set_ylim(0, 1)
        if all(not v for values in bars.values() for v in values):
            ax.text(0.5, 0.5, f"every {name} is 0 (see the loss)", ha="center",
                    transform=ax.transAxes)
    ax.set_xticks(range(len(groups)), [f"{g} test" for g in groups])
    ax.set_ylabel(name)
    ax.set_title(f"{name} of each variant's final adapter")
    ax.legend(fontsize=7, ncols=2)


def make_figures(series: dict[str, Any], kinds: dict[str, str]) -> dict[str, Figure]:
    """Plot name -> matplotlib Figure (no pyplot: no global state, no display needed)."""
    figs: dict[str, Figure] = {}
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    _lines(left, series["global_loss"], kinds, "global test loss", "loss per response token")
    _lines(right, series["train_loss"], kinds, "training loss (clients' local steps)", "loss")
    figs["loss"] = fig
    if series["global_exact_match"]:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        _lines(ax, series["global_exact_match"], kinds, "global test exact match", "exact match")
        ax.set_ylim(0, 1)
        figs["accuracy"] = fig
    per = series["per_client"]
    panels = [(per["metric"], per["bars"])] + ([("loss", per["loss_bars"])] if per["loss_bars"] else [])
    fig = Figure(figsize=(11, 4 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (metric, bars) in zip(axes, panels):
        _bars(ax, per["groups"], bars, metric, kinds)
    figs["per_client"] = fig
    # Up and down in panels of their own: with equal sizes one line would hide the other.
    fig = Figure(figsize=(11, 4), layout="constrained")
    colours = _colours(kinds)
    for ax, key, what in zip(fig.subplots(1, 2), ("bytes_down", "bytes_up"),
                             ("down (server to clients)", "up (clients to server)")):
        for label, line in series[key].items():
            ax.plot(line["x"], line["y"], "-", marker="o", markersize=3,
                    label=f"{label} {key.split('_')[1]}", color=colours.get(label))
        _rounds_axis(ax, f"adapter bytes {what}, all clients", "bytes")
        ax.set_ylim(bottom=0)
        if series[key]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no federated variant", ha="center", transform=ax.transAxes)
    fig.suptitle("local-only and centralised send no adapter bytes", fontsize=9)
    figs["bytes"] = fig
    return figs


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}
td:nth-child(n+3){text-align:right}th{background:#f2f2f2}img{max-width:100%;margin:1em 0}
code{background:#f4f4f4;padding:1px 4px}"""


def write_report(out_dir: Path, results: list[VariantResult], *, title: str, budget: str) -> Path:
    """Write plots.json, one PNG per plot and report.html (the PNGs embedded) into `out_dir`."""
    out_dir = Path(out_dir)
    series = plot_series(results)
    (out_dir / "plots.json").write_text(json.dumps(series, indent=1) + "\n")
    kinds = {r.variant: r.kind for r in results}
    sections = []
    for name, fig in make_figures(series, kinds).items():
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        sections.append(f"<h2>{html.escape(PLOTS[name])}</h2>\n"
                        f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    header, rows = table_cells(results)
    runs = "".join(f'<li><a href="{html.escape(Path(r.run_dir).name)}/">{html.escape(r.variant)}</a></li>'
                   for r in results if r.run_dir)
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in comparison(results))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p><b>Budget:</b> {html.escape(budget)}.</p>
{_html_table(header, rows)}
<ul>{notes}</ul>
{chr(10).join(sections)}
<h2>Run directories</h2><ul>{runs}</ul>
<p>Also here: <code>results.md</code>, <code>results.csv</code>, <code>results.json</code>,
<code>plots.json</code> (the plotted series) and the PNG files.</p>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
