"""How long the light `fedtune` commands take to answer, each in a fresh process.

Four commands that need no model: `--help`, `recipes`, `algorithms`, and a recipe error (an
unknown key given as an override). Each runs `--repeat` times (default 3) in a new interpreter;
the table shows the median and the fastest wall time, the median CPU time (user + system; less
sensitive to other work on a shared machine than wall time) and whether torch was imported (a
command that imports torch, transformers or peft pays seconds before it can answer). A plain
`python -c pass` is measured the same way, as the floor of this machine at this moment.

    python benchmarks/startup.py
    python benchmarks/startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS: list[tuple[str, list[str], int]] = [   # (label, arguments, expected exit code)
    ("fedtune --help", ["--help"], 0),
    ("fedtune recipes", ["recipes"], 0),
    ("fedtune algorithms", ["algorithms"], 0),
    ("recipe error (fedtune run default no.such=1)", ["run", "default", "no.such=1"], 2),
]

# Runs the command in-process after noting the time, then reports whether torch got imported.
_PROBE = """
import sys, runpy
sys.argv = ["fedtune", *sys.argv[1:]]
try:
    runpy.run_module("fedtune", run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
else:
    code = 0
sys.stderr.write(f"\\n@@torch={'torch' in sys.modules} code={code}\\n")
sys.exit(code)
"""


def _time(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) of the child, and its stderr."""
    env = {**os.environ, "COLUMNS": "120"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, out.stderr


def measure(args: list[str], expected: int, repeat: int) -> tuple[float, float, float, bool]:
    """Median and best wall seconds, median CPU seconds, and whether torch was imported."""
    times, cpus, torch = [], [], False
    for _ in range(repeat):
        elapsed, cpu, err = _time([sys.executable, "-c", _PROBE, *args])
        tail = err.rsplit("@@", 1)[-1]
        if f"code={expected}" not in tail:
            raise SystemExit(f"fedtune {' '.join(args)} exited unexpectedly:\n{err[-2000:]}")
        torch = torch or "torch=True" in tail
        times.append(elapsed)
        cpus.append(cpu)
    return statistics.median(times), min(times), statistics.median(cpus), torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (median shown)")
    opts = parser.parse_args()
    floor = [_time([sys.executable, "-c", "pass"]) for _ in range(opts.repeat)]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'command':<48} {'median s':>9} {'best s':>7} {'cpu s':>6}  torch imported")
    print(f"{'python -c pass (interpreter start)':<48} "
          f"{statistics.median(t for t, _, _ in floor):>9.2f} {'':>7} "
          f"{statistics.median(c for _, c, _ in floor):>6.2f}")
    for label, args, expected in COMMANDS:
        median, best, cpu, torch = measure(args, expected, opts.repeat)
        print(f"{label:<48} {median:>9.2f} {best:>7.2f} {cpu:>6.2f}  {'yes' if torch else 'no'}")


if __name__ == "__main__":
    main()
