"""HumanEval with a model: generate completions, test them in the sandbox, pass@k, a sample log.

Used by `fedtune eval --humaneval` and, with `eval.humaneval` in the recipe, at the end of
training. Generated code runs only through `evaluate_completions` (separate, limited processes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.config import HumanEvalSection
from fedtune.eval.errors import EvalError
from fedtune.eval.evaluator import Evaluator
from fedtune.eval.humaneval import STOP_SEQUENCES, evaluate_completions, load_problems
from fedtune.seeding import derive_seed

_EXCEPTION = re.compile(r"failed: ([A-Za-z_][\w.]*)(?::|$)")


def error_kind(reason: str) -> str | None:
    """A short class of a sandbox reason: None (passed), timeout, refused, exited, limit,
    the exception's name ("AssertionError", "SyntaxError", ...), or failed."""
    if reason == "passed":
        return None
    for prefix, kind in (("timed out", "timeout"), ("refused:", "refused"), ("exited", "exited")):
        if reason.startswith(prefix):
            return kind
    found = _EXCEPTION.match(reason)
    if found:
        return found.group(1).rsplit(".", 1)[-1]
    return "failed" if reason.startswith("failed") else "limit"


def free_path(path: Path) -> Path:
    """`path`, or `name-1.ext`, `name-2.ext`, ... : the first that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name.removesuffix(''.join(path.suffixes))}-{n}"
                                   f"{''.join(path.suffixes)}")
        n += 1
    return candidate


def write_samples(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the rows as JSON lines to a new file (never over an existing one); its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        target = free_path(path)
        try:
            with target.open("x", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return target
        except FileExistsError:  # appeared meanwhile: take the next free name
            continue
        except OSError as exc:
            raise EvalError(f"cannot write the HumanEval samples to {target}: {exc}") from None


def run_humaneval(evaluator: Evaluator, section: HumanEvalSection, *, seed: int,
                  samples_path: Path, console: Console | None = None,
                  problems: dict[str, dict] | None = None) -> dict[str, Any]:
    """Generate `section.samples` completions per problem, test them sandboxed, report pass@k.

    Per-sample rows (task_id, sample, completion, passed, error, reason) go to a new JSONL file
    at `samples_path` (or a free name beside it). Returns `humaneval_pass@K`, task and sample
    counts, prompts cut to fit, and `humaneval_samples_file`. `problems`: already loaded ones.
    """
    problems = problems if problems is not None else load_problems(section.problems)
    chosen = list(problems)[:section.limit] if section.limit else list(problems)
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        total = len(chosen) * section.samples
        generating = progress.add_task("generating", total=total)
        texts, n_cut = evaluator.complete(
            [problems[task]["prompt"] for task in chosen], samples=section.samples,
            max_new_tokens=section.max_new_tokens, temperature=section.temperature,
            top_p=section.top_p, stop=STOP_SEQUENCES, seed=derive_seed(seed, "humaneval"),
            progress=lambda n: progress.advance(generating, n),
        )
        testing = progress.add_task("testing", total=total)
        completions = dict(zip(chosen, texts))
        outcome = evaluate_completions(
            problems, completions, k=section.k or (1,), timeout=section.timeout,
            memory_mb=section.memory_mb,
            progress=lambda done, _: progress.update(testing, completed=done),
        )
    rows = [{"task_id": task, "sample": i, "completion": text, "passed": run["passed"],
             "error": error_kind(run["reason"]), "reason": run["reason"]}
            for task in chosen
            for i, (text, run) in enumerate(zip(completions[task], outcome["results"][task]))]
    written = write_samples(rows, samples_path)
    metrics = {f"humaneval_{key}": value for key, value in outcome.items()
               if key.startswith("pass@")}
    metrics.update(humaneval_tasks=outcome["n_tasks"], humaneval_samples=outcome["n_samples"],
                   humaneval_prompts_cut=n_cut, humaneval_samples_file=str(written))
    return metrics
