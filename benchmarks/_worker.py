"""Benchmark workers: each configuration runs the default recipe in a fresh interpreter.

The parent calls `spawn(script, overrides)`, which runs `script --worker OVERRIDES`; the script's
`--worker` branch calls `run_default(overrides, keys)`, which prints the chosen summary figures as
one JSON line. A fresh process per configuration keeps one run's memory and threads out of the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any


def run_default(overrides: list[str], keys: tuple[str, ...]) -> None:
    """The worker side: run the default recipe with `overrides`, print `keys` of its summary."""
    import fedtune

    with tempfile.TemporaryDirectory() as out:
        s = fedtune.run("default", [*overrides, f"output.dir={out}", "output.progress=false"])
    print(json.dumps({k: s[k] for k in keys}))


def spawn(script: str, overrides: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The parent side: (the worker's figures, "") or (None, the last line of its error output)."""
    proc = subprocess.run([sys.executable, script, "--worker", *overrides],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def final_only(rounds: int) -> list[str]:
    """Overrides for a run judged only at its end: no evaluation before, one checkpoint at the end."""
    return [f"federation.rounds={rounds}", "eval.every=0", "eval.at_start=false",
            "eval.clients=false", f"output.checkpoint_every={rounds}"]
