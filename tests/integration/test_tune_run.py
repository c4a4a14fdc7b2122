"""`fedtune tune` over real federated runs of the tiny model: the server's on_eval hook stops a run
cleanly, each trial has its own run directory, and best.yaml is the best trial's recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import load_recipe

optuna = pytest.importorskip("optuna")


def test_on_eval_stops_the_run_cleanly_after_that_round(tiny_recipe):
    from fedtune.runtime.simulation import run

    seen = []

    def on_eval(round_, metrics):
        seen.append((round_, sorted(metrics)))
        return round_ == 1

    summary = run(tiny_recipe(federation={"clients": 3, "rounds": 3}), on_eval=on_eval)
    assert [r for r, _ in seen] == [1]            # called during training only, then stopped
    assert "loss" in seen[0][1] and "exact_match" in seen[0][1]
    assert summary["rounds"] == 1
    run_dir = Path(summary["final_adapter"]).parent
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1
    assert (run_dir / "final" / "adapter_config.json").exists()
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(rounds) == 1


def test_a_study_of_real_runs_writes_best_yaml_equal_to_the_best_trials_recipe(tiny_recipe, tmp_path):
    from fedtune.tune import tune

    data = tiny_recipe(tune={"metric": "loss", "trials": 2, "sampler": "grid", "pruner": "none",
                             "params": {"train.lr": {"type": "categorical", "choices": [0.05, 1e-5]}}})
    out = tune(data)
    assert out["counts"]["complete"] == 2
    study_dir = Path(out["study_dir"])
    trials = sorted((study_dir / "trials").iterdir())
    assert [t.name for t in trials] == ["trial-0000", "trial-0001"]
    losses = {}
    for t in trials:
        recipe = load_recipe(t / "recipe.yaml")
        losses[recipe.train.lr] = json.loads((t / "summary.json").read_text())["final"]["loss"]
    best_lr = min(losses, key=losses.get)
    assert best_lr == 0.05 and out["best_value"] == pytest.approx(losses[0.05])
    # best.yaml loads as the best trial's recipe, with the study's output section put back.
    best = load_recipe(study_dir / "best.yaml")
    trial_number = out["best_trial"]
    trial = load_recipe(study_dir / "trials" / f"trial-{trial_number:04d}" / "recipe.yaml")
    assert best.train.lr == 0.05 and best.tune is None
    assert best.model_copy(update={"output": trial.output}) == trial
    assert best.output == load_recipe(data).output
    assert "data:image/png;base64," in (study_dir / "report.html").read_text()
