"""A study's results people can read: the table of trials (values, metric, state, rounds, wall
time) as trials.md/trials.csv and a rich table, and the best trial's recipe as best.yaml."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import optuna
from rich.table import Table

from fedtune.config import Recipe
from fedtune.tune.study import trial_recipe


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def trial_rows(study: optuna.Study, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and one row per trial, in trial order: its values, the metric (the final one, or
    the last reported for a pruned trial), state, rounds run, wall seconds."""
    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    header = ["trial", *keys, metric, "state", "rounds", "wall s"]
    rows = []
    for t in trials:
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rounds = t.user_attrs.get("rounds")
        if rounds is None and t.intermediate_values:
            rounds = max(t.intermediate_values)
        state = t.state.name.lower() + (" (diverged)" if t.user_attrs.get("diverged") else "")
        rows.append([str(t.number), *[_cell(t.params.get(k)) for k in keys], _cell(value), state,
                     _cell(rounds), _cell(t.user_attrs.get("wall_seconds"))])
    return header, rows


def rich_table(header: list[str], rows: list[list[str]], title: str) -> Table:
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name == "state" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def write_tables(out: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(out / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        best = study.best_trial
    except ValueError:   # no complete trial yet
        return None
    return best if best.value is not None and math.isfinite(best.value) else None


def best_recipe(base: Recipe, trial: optuna.trial.FrozenTrial) -> Recipe:
    """The best trial's recipe at full fidelity, as `fedtune run` takes it: the base recipe (its
    output section, no tune section, no low-fidelity knobs) with the trial's values."""
    return trial_recipe(base, dict(trial.params), fidelity=False)


def write_best(out: Path, base: Recipe, trial: optuna.trial.FrozenTrial, metric: str) -> Path:
    recipe = best_recipe(base, trial)
    shown = ", ".join(f"{k}={_cell(v)}" for k, v in trial.params.items())
    header = (f"# fedtune tune: the best trial ({trial.number}) of study {base.tune.study or base.name}"
              f", {metric} {_cell(trial.value)}\n# {shown}\n# run it: fedtune run {out / 'best.yaml'}\n")
    path = out / "best.yaml"
    path.write_text(header + recipe.to_yaml())
    return path
