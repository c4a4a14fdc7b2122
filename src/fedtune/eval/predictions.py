"""Per-example predictions of a generation-based evaluation, one JSON line each, in the run directory.

`predictions/round_0040_global.jsonl` holds the server's evaluation of the global test set at round
40; `round_0040_client_1.jsonl` the evaluation client_1 made of its own test part (written by that
client, in its own directory: the server never receives client prompts). Each line:
{"index", "prompt", "reference", "output", <one score per metric>}.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def predictions_path(directory: str | Path, round_: int, scope: str) -> Path:
    """`directory/round_0040_<scope>.jsonl`; characters other than letters, digits, `_.-` become `_`."""
    return Path(directory) / f"round_{round_:04d}_{_SAFE.sub('_', scope)}.jsonl"


def write_predictions(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write the records as JSON lines (atomically: a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for index, record in enumerate(records):
            f.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_predictions(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of a predictions file (all without a limit)."""
    rows: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _short(text: Any, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def predictions_table(rows: list[dict[str, Any]], *, title: str = "predictions", width: int = 48):
    """A rich table of prediction records: the end of the prompt, the reference and the output."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("#", "prompt (end)", "reference", "output"):
        table.add_column(column, overflow="fold")
    for row in rows:
        prompt = " ".join(str(row.get("prompt", "")).split())
        table.add_row(str(row.get("index", "")), ("…" + prompt[-width:]) if len(prompt) > width else prompt,
                      _short(row.get("reference", ""), width), _short(row.get("output", ""), width))
    return table
