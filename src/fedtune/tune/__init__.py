"""`fedtune tune`: federated hyper-parameter optimisation on Optuna (docs/tune.md).

Each trial is a full federated run of the recipe with the values the sampler picks for the
`tune.params` key paths, in its own run directory under the study's directory; the study lives in
a database (SQLite there by default, any SQLAlchemy URL), so it can be resumed and shared by
several workers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.config import Recipe, load_recipe

__all__ = ["tune"]


def tune(recipe: Recipe | str | Path | dict | None = None, overrides: list[str] | None = None, *,
         resume: bool = False, storage: str | None = None, trials: int | None = None,
         console: Console | None = None, run=None) -> dict[str, Any]:
    """Run (or continue, or join) the recipe's study; write the tables, best.yaml and report.html
    into the study directory and return {study_dir, storage, best_value, best_params, counts}.

    `trials` overrides tune.trials (the study's total over every worker); `run` replaces
    fedtune.run (tests)."""
    import optuna

    from fedtune.tune import study as st

    console = console or Console()
    base = load_recipe(recipe, overrides)
    tune_section = st._tune(base)
    st.check_space(base)
    place = st.study_place(base, storage)
    place.dir.mkdir(parents=True, exist_ok=True)
    study = st.open_study(base, place, resume=resume)
    if not (place.dir / "recipe.yaml").exists():
        (place.dir / "recipe.yaml").write_text(base.to_yaml())
    total = trials or tune_section.trials
    console.print(f"study {place.name} ({place.storage}): {st.counted(study)} of {total} trials "
                  f"done; {tune_section.sampler} sampler, {tune_section.pruner.name} pruner, "
                  f"{'maximise' if tune_section.maximize else 'minimise'} {tune_section.metric}")
    objective = st.Objective(base, place, run=run, log=console.print)
    try:
        st.optimize(study, objective, total)
    finally:   # the tables and report show what is done, also after Ctrl-C
        summary = write_results(base, study, place, console)
    return summary | {"counts": {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                                 for s in optuna.trial.TrialState}}


def write_results(base: Recipe, study, place, console: Console) -> dict[str, Any]:
    from fedtune.tune import report, results

    metric = base.tune.metric
    header, rows = results.trial_rows(study, metric)
    results.write_tables(place.dir, header, rows)
    console.print(results.rich_table(header, rows, f"study {place.name}: {len(rows)} trials"))
    best = results.best_trial(study)
    best_text = None
    if best is not None:
        path = results.write_best(place.dir, base, best, metric)
        best_text = path.read_text()
        console.print(f"best: trial {best.number}, {metric} {best.value:.4g}; recipe {path}")
    notes = [f"storage: {place.storage}", f"objective: {'maximise' if base.tune.maximize else 'minimise'} "
             f"{metric}; sampler {base.tune.sampler}, pruner {base.tune.pruner.name}"]
    if base.tune.fidelity:
        notes.append("low-fidelity trials: " + ", ".join(f"{k}={v}" for k, v in base.tune.fidelity.items())
                     + " (best.yaml is written without them)")
    path = report.write_report(place.dir, study, header, rows, title=f"fedtune tune: {place.name}",
                               notes=notes, best_yaml=best_text, metric=metric)
    console.print(f"report: {path}")
    return {"study_dir": str(place.dir), "storage": place.storage, "report": str(path),
            "best_value": best.value if best else None, "best_params": dict(best.params) if best else None,
            "best_trial": best.number if best else None}
