"""A study's HTML report: Optuna's matplotlib plots (optimisation history, the trials' reported
evaluations per round, parameter importances, parallel coordinates) as PNGs embedded in one
self-contained page, with the table of trials and the best recipe."""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display; set before pyplot loads (optuna's plots use pyplot)

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

PLOTS = {
    "history": ("Optimisation history", lambda s: ovm.plot_optimization_history(s)),
    "rounds": ("Each trial's evaluations per round (pruned trials stop early)",
               lambda s: ovm.plot_intermediate_values(s)),
    "importances": ("Parameter importances (fANOVA)", lambda s: ovm.plot_param_importances(s)),
    "parallel": ("Parallel coordinates", lambda s: ovm.plot_parallel_coordinate(s)),
}

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}
td{text-align:right}th{background:#f2f2f2}img{max-width:100%;margin:1em 0}
pre{background:#f4f4f4;padding:8px;overflow-x:auto}"""


def draw(study: optuna.Study, metric: str = "objective value") -> dict[str, bytes | str]:
    """Plot name -> PNG bytes, or why it was not drawn (too few trials, one value only, ...)."""
    out: dict[str, bytes | str] = {}
    for name, (_, plot) in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # optuna's matplotlib plots are "experimental"
                ax = plot(study)
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            if name == "rounds":
                ax.set_xlabel("round")
                ax.set_ylabel(metric)
            elif name == "history":
                ax.set_ylabel(metric)
            fig = ax.figure
            fig.set_size_inches(9, 4.5)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            out[name] = buf.getvalue()
        except Exception as exc:   # optuna refuses plots it cannot draw (e.g. importances of 1 trial)
            out[name] = f"not drawn: {type(exc).__name__}: {exc}"
        finally:
            plt.close("all")
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(out: Path, study: optuna.Study, header: list[str], rows: list[list[str]], *,
                 title: str, notes: list[str], best_yaml: str | None, metric: str) -> Path:
    """report.html in `out`, with each plot also saved as a PNG beside it."""
    sections = []
    for name, result in draw(study, metric).items():
        heading = html.escape(PLOTS[name][0])
        if isinstance(result, bytes):
            (out / f"{name}.png").write_bytes(result)
            data = base64.b64encode(result).decode("ascii")
            sections.append(f'<h2>{heading}</h2>\n<img alt="{name}" src="data:image/png;base64,{data}">')
        else:
            sections.append(f"<h2>{heading}</h2>\n<p>{html.escape(result)}</p>")
    best = (f"<h2>Best recipe (best.yaml)</h2><pre>{html.escape(best_yaml)}</pre>"
            if best_yaml else "<p>No complete trial yet: no best recipe.</p>")
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{items}</ul>
{_table(header, rows)}
{chr(10).join(sections)}
{best}
<p>Also here: <code>trials.md</code>, <code>trials.csv</code>, <code>best.yaml</code>, the PNG
files and <code>trials/</code> (one run directory per trial).</p>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
