"""`fedtune tune` without training: the tune section's checks, the trials' recipes and best.yaml,
pruning on reported rounds, resume and two concurrent workers on one SQLite study (a stand-in
for fedtune.run whose metric is a known function of the trial's values)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedtune.config import load_recipe
from fedtune.errors import RecipeError

optuna = pytest.importorskip("optuna")

from fedtune.tune import tune  # noqa: E402
from fedtune.tune.study import TuneError, trial_recipe  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _recipe(tmp_path: Path, **tune_keys) -> dict:
    tune_section = {"metric": "val_loss", "trials": 4, "sampler": "random", "pruner": "none",
                    "params": {"train.lr": {"type": "log_uniform", "low": 1e-4, "high": 1e-1}},
                    **tune_keys}
    return {"name": "t", "seed": 1, "federation": {"rounds": 8, "clients": 3},
            "eval": {"every": 2}, "output": {"dir": str(tmp_path / "runs")}, "tune": tune_section}


def fake_loss(lr: float, round_: int) -> float:
    """Best at lr = 1e-2; every trial improves with rounds the same way (ranking kept)."""
    return (math.log10(lr) + 2.0) ** 2 + 8.0 / round_


class FakeRun:
    """fedtune.run's stand-in: reports val_loss at every eval.every round; stops when told."""

    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def __call__(self, recipe, on_eval=None):
        rounds, every = recipe.federation.rounds, recipe.eval.every
        values = {"train.lr": recipe.train.lr, "adapter.r": recipe.adapter.r}
        last = rounds
        for r in range(every, rounds + 1, every):
            metrics = {"val_loss": fake_loss(recipe.train.lr, r), "exact_match": 0.5}
            if r < rounds and on_eval is not None and on_eval(r, metrics):
                last = r
                break
        self.calls.append((values, last))
        return {"rounds": last, "final": {"val_loss": fake_loss(recipe.train.lr, last)}}


# -- the tune section ---------------------------------------------------------------------------


def test_a_wrong_key_path_names_file_line_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""\
        name: r
        eval: {every: 1}
        tune:
          params:
            train.lr: {type: log_uniform, low: 1.0e-4, high: 1.0e-2}
            train.lrr: {type: uniform, low: 0, high: 1}
            adapter: {type: int, low: 1, high: 3}
            federation.options: {type: categorical, choices: [1, 2]}
        """))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}, line 6: tune.params.train.lrr" in text and "'lrr' is not a key of train" in text
    assert "lr_schedule" in text   # what is allowed there
    assert f"{path}, line 7: tune.params.adapter" in text and "is a section" in text
    assert f"{path}, line 8: tune.params.federation.options" in text and "is a mapping" in text


@pytest.mark.parametrize("param, message", [
    ({"type": "log_uniform", "low": 0, "high": 1}, "low > 0"),
    ({"type": "uniform", "low": 2, "high": 1}, "low <= high"),
    ({"type": "int", "low": 1.5, "high": 4}, "whole numbers"),
    ({"type": "categorical"}, "needs choices"),
    ({"type": "uniform", "low": 0, "high": 1, "choices": [1]}, "not choices"),
])
def test_bad_distributions_are_refused(tmp_path, param, message):
    data = _recipe(tmp_path, params={"train.weight_decay": param})
    with pytest.raises(RecipeError, match=message):
        load_recipe(data)


def test_the_metric_must_be_measured_and_pruning_needs_evaluations(tmp_path):
    with pytest.raises(RecipeError, match="rouge_l.*is not measured"):
        load_recipe(_recipe(tmp_path, metric="rouge_l"))
    data = _recipe(tmp_path, pruner="median_stopping")
    data["eval"] = {"every": 0}
    with pytest.raises(RecipeError, match="set eval.every"):
        load_recipe(data)
    with pytest.raises(RecipeError, match="may not set"):
        load_recipe(_recipe(tmp_path, params={"output.dir": {"type": "categorical", "choices": ["a"]}}))


def test_the_grid_sampler_needs_discrete_values(tmp_path):
    with pytest.raises(RecipeError, match="grid sampler needs categorical or int"):
        load_recipe(_recipe(tmp_path, sampler="grid"))


def test_direction_follows_the_metric(tmp_path):
    assert not load_recipe(_recipe(tmp_path)).tune.maximize
    assert load_recipe(_recipe(tmp_path, metric="exact_match")).tune.maximize
    assert not load_recipe(_recipe(tmp_path, metric="exact_match", direction="minimize")).tune.maximize


def test_a_value_at_the_edge_that_breaks_the_recipe_fails_before_any_trial(tmp_path):
    data = _recipe(tmp_path, params={"federation.clients_per_round": {"type": "int", "low": 1, "high": 5}})
    run = FakeRun()
    with pytest.raises(RecipeError, match=r"(?s)clients_per_round: the value 5.*at most federation.clients \(3\)"):
        tune(data, run=run)
    assert run.calls == []


# -- trials' recipes and best.yaml ----------------------------------------------------------------


def test_a_trial_recipe_has_the_values_and_best_yaml_loads_as_that_recipe(tmp_path):
    data = _recipe(tmp_path, fidelity={"federation.clients_per_round": 2})
    data["federation"]["algorithm"] = "fedadam"
    base = load_recipe(data)
    trial = trial_recipe(base, {"train.lr": 0.02, "federation.options.server_lr": 0.5})
    assert trial.train.lr == 0.02 and trial.federation.options == {"server_lr": 0.5}
    assert trial.federation.clients_per_round == 2 and trial.tune is None
    full = trial_recipe(base, {"train.lr": 0.02}, fidelity=False)
    assert full.federation.clients_per_round is None


def test_a_study_writes_tables_best_yaml_and_a_report(tmp_path):
    data = _recipe(tmp_path, trials=6, params={
        "train.lr": {"type": "log_uniform", "low": 1e-4, "high": 1e-1},
        "adapter.r": {"type": "categorical", "choices": [4, 8]}})
    run = FakeRun()
    out = tune(data, run=run)
    assert len(run.calls) == 6 and out["counts"]["complete"] == 6
    # The best is the trial whose lr is nearest 1e-2 (the fake loss is known).
    best_lr = min((v["train.lr"] for v, _ in run.calls), key=lambda lr: abs(math.log10(lr) + 2))
    assert out["best_params"]["train.lr"] == pytest.approx(best_lr)
    study_dir = Path(out["study_dir"])
    assert study_dir == tmp_path / "runs" / "tune-t"
    best = load_recipe(study_dir / "best.yaml")
    assert best.train.lr == pytest.approx(best_lr) and best.tune is None
    expected = load_recipe(data).model_copy(deep=True)
    expected_data = expected.model_dump(mode="json")
    expected_data["tune"] = None
    expected_data["train"]["lr"] = best_lr
    expected_data["adapter"]["r"] = out["best_params"]["adapter.r"]
    assert best == load_recipe(expected_data)
    rows = (study_dir / "trials.csv").read_text().splitlines()
    assert rows[0] == "trial,train.lr,adapter.r,val_loss,state,rounds,wall s" and len(rows) == 7
    html = (study_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "Parallel coordinates" in html


def test_a_resumed_study_refuses_another_search_space(tmp_path):
    data = _recipe(tmp_path, trials=1)
    tune(data, run=FakeRun())
    data["tune"]["params"]["train.lr"]["high"] = 0.5
    with pytest.raises(TuneError, match="another recipe or search space"):
        tune(data, run=FakeRun(), resume=True)


def test_median_pruning_stops_a_bad_trial_early(tmp_path):
    data = _recipe(tmp_path, trials=3, pruner={"name": "median_stopping", "startup_trials": 2,
                                               "warmup_rounds": 2},
                   params={"train.lr": {"type": "categorical", "choices": [1e-2, 1e-4]}})
    base = load_recipe(data)
    from fedtune.tune import study as st
    place = st.study_place(base)
    place.dir.mkdir(parents=True)
    s = st.open_study(base, place, resume=False)
    for lr in (1e-2, 1e-2, 1e-4):
        s.enqueue_trial({"train.lr": lr})
    run = FakeRun()
    st.optimize(s, st.Objective(base, place, run=run, log=lambda *_: None), 3)
    # lr 1e-4: loss 4 + 8/2 = 8 at round 2, above the median 0 + 4 = 4: pruned at round 2.
    assert run.calls == [({"train.lr": 1e-2, "adapter.r": 8}, 8), ({"train.lr": 1e-2, "adapter.r": 8}, 8),
                         ({"train.lr": 1e-4, "adapter.r": 8}, 2)]
    states = [t.state for t in s.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    assert s.get_trials()[2].intermediate_values == {2: pytest.approx(8.0)}


# -- a study that lasts ---------------------------------------------------------------------------


def test_resume_continues_the_study_to_the_new_total(tmp_path):
    data = _recipe(tmp_path, trials=3)
    run = FakeRun()
    tune(data, run=run)
    assert len(run.calls) == 3
    with pytest.raises(TuneError, match="exists"):
        tune(data, run=run)
    out = tune(data, run=run, resume=True, trials=5)
    assert len(run.calls) == 5 and out["counts"]["complete"] == 5
    numbers = [t.number for t in optuna.load_study(study_name="t", storage=out["storage"]).trials]
    assert numbers == [0, 1, 2, 3, 4]
    assert tune(data, run=run, resume=True)["counts"]["complete"] == 5   # done: no more trials
    assert len(run.calls) == 5
    data["tune"]["study"] = "other"
    with pytest.raises(TuneError, match="no study 'other'"):
        tune(data, run=run, resume=True)


def test_an_interrupted_trial_runs_again_on_resume(tmp_path):
    data = _recipe(tmp_path, trials=2)
    run = FakeRun()
    seen = []

    def interrupted(recipe, on_eval=None):
        seen.append(recipe.train.lr)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return run(recipe, on_eval)

    with pytest.raises(KeyboardInterrupt):
        tune(data, run=interrupted)
    out = tune(data, run=run, resume=True)
    assert run.calls[1][0]["train.lr"] == seen[1]   # the same values again
    assert out["counts"] == {**out["counts"], "complete": 2, "fail": 1}


WORKER = """
import sys, time
sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
from test_tune import FakeRun
from fedtune.tune import tune
run = FakeRun()
def slow(recipe, on_eval=None):
    time.sleep(0.2)
    return run(recipe, on_eval)
import os
tune({data!r}, run=slow, resume={resume})
print("TRIALS", len(run.calls))
"""


def test_two_workers_share_one_sqlite_study(tmp_path):
    data = _recipe(tmp_path, trials=3)
    tests = str(Path(__file__).parent)
    first = subprocess.run([sys.executable, "-c", WORKER.format(src=SRC, tests=tests, data=data, resume=False)],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    data["tune"]["trials"] = 9   # both join the same study for 6 more trials
    workers = [subprocess.Popen([sys.executable, "-c", WORKER.format(src=SRC, tests=tests, data=data, resume=True)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    done = [int(o.split("TRIALS")[1]) for o, _ in outs]
    assert all(n >= 1 for n in done), done     # each worker ran trials of the shared study
    storage = f"sqlite:///{(tmp_path / 'runs' / 'tune-t' / 'study.db').resolve()}"
    trials = optuna.load_study(study_name="t", storage=storage).trials
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials)))   # no number taken twice
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    lrs = [t.params["train.lr"] for t in complete]
    assert len(set(lrs)) == len(lrs)   # each worker samples its own values, none proposed twice
    # Optuna's MaxTrialsCallback stops each worker once 9 are done; the other may finish a last one
    assert 9 <= len(complete) <= 10 and sum(done) == len(complete) - 3


def test_the_command_refuses_a_recipe_without_a_tune_section(tmp_path, capsys):
    from fedtune.cli import main, parse_args, tune_interrupted

    assert main(["tune", "default", f"output.dir={tmp_path}"]) == 2
    assert "has no tune section" in capsys.readouterr().err
    args = parse_args(["tune", "my recipe.yaml", "--storage", "sqlite:///s.db", "tune.trials=3"])
    assert args.resume is False and args.items == ["my recipe.yaml", "tune.trials=3"]
    assert tune_interrupted(args, KeyboardInterrupt()).startswith(
        "interrupted; continue the study with `fedtune tune 'my recipe.yaml' tune.trials=3 "
        "--storage sqlite:///s.db --resume`")


def test_values_that_clash_fail_their_trial_and_the_study_goes_on(tmp_path):
    # Each value loads alone; clients_per_round 3 with clients 2 does not: that trial fails.
    data = _recipe(tmp_path, trials=6, sampler="grid", params={
        "federation.clients_per_round": {"type": "int", "low": 2, "high": 3},
        "federation.clients": {"type": "categorical", "choices": [2, 3]}})
    run = FakeRun()
    out = tune(data, run=run)
    assert out["counts"]["complete"] == 3 and out["counts"]["fail"] == 1 and len(run.calls) == 3
    failed = [t for t in optuna.load_study(study_name="t", storage=out["storage"]).trials
              if t.state == optuna.trial.TrialState.FAIL]
    assert failed[0].params == {"federation.clients_per_round": 3, "federation.clients": 2}
    assert "at most federation.clients (2)" in failed[0].user_attrs["error"]


def test_a_storage_url_that_cannot_be_used_is_a_clear_error(tmp_path):
    with pytest.raises(TuneError, match=r"tune storage 'nosuchdb://x/y'"):
        tune(_recipe(tmp_path), storage="nosuchdb://x/y", run=FakeRun())


def test_the_median_pruner_waits_a_quarter_of_the_rounds_by_default(tmp_path):
    from fedtune.tune.study import make_pruner

    data = _recipe(tmp_path, pruner="median_stopping")
    data["federation"]["rounds"] = 40
    assert make_pruner(load_recipe(data))._n_warmup_steps == 10
    data["tune"]["pruner"] = {"name": "median_stopping", "warmup_rounds": 0}
    assert make_pruner(load_recipe(data))._n_warmup_steps == 0


def test_the_first_trial_is_the_recipes_own_values(tmp_path):
    data = _recipe(tmp_path, trials=2, params={
        "train.lr": {"type": "log_uniform", "low": 1e-4, "high": 1e-1},
        "federation.options.server_lr": {"type": "log_uniform", "low": 1e-3, "high": 1.0},
        "adapter.r": {"type": "categorical", "choices": [4, 16]}})
    data["federation"]["algorithm"] = "fedadam"
    data["train"] = {"lr": 0.003}
    run = FakeRun()
    tune(data, run=run)
    # lr from the recipe, server_lr FedAdam's default (0.01); adapter.r 8 is not a choice: sampled
    first = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'runs' / 'tune-t' / 'study.db'}").trials[0]
    assert first.params["train.lr"] == 0.003 and first.params["federation.options.server_lr"] == 0.01
    assert first.params["adapter.r"] in (4, 16) and first.user_attrs["baseline"] is True
    assert run.calls[0][0]["train.lr"] == 0.003


def test_a_run_that_fails_fails_its_trial_and_the_study_goes_on(tmp_path):
    from fedtune.errors import MessageError

    run = FakeRun()

    def diverging(recipe, on_eval=None):   # a client's NaN loss cannot travel: the run stops
        if recipe.train.lr > 0.01:
            raise MessageError("meta['metrics']['train_loss'] is nan; only finite floats may travel")
        return run(recipe, on_eval)

    data = _recipe(tmp_path, trials=2, sampler="grid",
                   params={"train.lr": {"type": "categorical", "choices": [0.05, 0.001, 0.003]}})
    out = tune(data, run=diverging)
    assert out["counts"]["complete"] == 2 and out["counts"]["fail"] == 1
    failed = [t for t in optuna.load_study(study_name="t", storage=out["storage"]).trials
              if t.state == optuna.trial.TrialState.FAIL][0]
    assert failed.params == {"train.lr": 0.05} and "is nan" in failed.user_attrs["error"]
    # every trial failing: the study stops after as many failures as trials asked for
    data["tune"].update(study="all-fail", sampler="random",
                        params={"train.lr": {"type": "uniform", "low": 0.02, "high": 0.05}})
    out = tune(data, run=diverging)
    assert out["counts"]["fail"] == 2 and out["counts"]["complete"] == 0
