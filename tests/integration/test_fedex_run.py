"""FedEx through whole simulated runs on the tiny Llama: θ recomputed by hand from the clients'
logged figures and moving towards the configuration with the lower validation loss, the drawn
learning rate used, a resume equal to the uninterrupted run, hostile feedback refused and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fedtune
from fedtune.algorithms.fedex import AFTER, BEFORE, CONFIG, FedExLocal
from fedtune.runtime.server import Server

GRID = {"train.lr": [1e-5, 5e-2], "train.local_steps": [3]}   # config 0 barely trains, 1 does


def _recipe(tiny_recipe, **kw):
    options = kw.pop("federation__options", {"base": "fedavg", "grid": GRID, "eta": 1.0, "schedule": "constant"})
    kw = {"eval__every": 0, **kw}
    return tiny_recipe(federation__algorithm="fedex", federation__options=options,
                       federation__clients=4, data__val_fraction=0.2, eval__at_start=False,
                       eval__exact_match=False, **kw)


def _events(summary):
    path = Path(summary["final_adapter"]).parent / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_theta_follows_the_clients_validation_losses(tiny_recipe):
    summary = fedtune.run(_recipe(tiny_recipe, output__name="fedex"))
    events = _events(summary)
    theta = np.array([0.5, 0.5])
    drawn = set()
    for round_ in (1, 2):
        fits = [e["values"] for e in events if e["kind"] == "fit" and e["round"] == round_]
        assert len(fits) == 4
        # θ's step by hand from what each client reported: L = after − before, weight = its
        # examples, λ = their weighted mean, ĝ_j = Σ w_i (L_i − λ)[c_i = j] / θ_j, η = 1 (constant)
        w = np.array([f["weight"] for f in fits], dtype=float)
        w /= w.sum()
        losses = np.array([f[AFTER] - f[BEFORE] for f in fits])
        lam = float(w @ losses)
        grad = np.zeros(2)
        for f, wi, li in zip(fits, w, losses):
            grad[f[CONFIG]] += wi * (li - lam) / theta[f[CONFIG]]
            assert f["lr"] == GRID["train.lr"][f[CONFIG]]   # the drawn lr was used
            drawn.add(f[CONFIG])
        theta = theta * np.exp(-grad)
        theta /= theta.sum()
        logged = next(e["values"] for e in events if e["kind"] == "round" and e["round"] == round_)
        np.testing.assert_allclose(logged["fedex_theta"], theta, rtol=1e-9)
        assert logged["fedex_baseline"] == pytest.approx(lam)
    assert drawn == {0, 1}
    # training at 5e-2 lowers the validation loss, at 1e-5 it barely moves: θ prefers config 1
    assert theta[1] > 0.5
    strategy = summary["strategy"]
    assert strategy["fedex_theta"] == pytest.approx(theta.tolist())
    assert strategy["fedex_best"] == 1
    assert strategy["fedex_best_config"] == {"train.lr": 5e-2, "train.local_steps": 3}


def _final(summary) -> dict[str, torch.Tensor]:
    run_dir = Path(summary["final_adapter"]).parent
    return load_file(str(sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "global.safetensors"))


def test_resume_equals_the_uninterrupted_run(tiny_recipe, monkeypatch):
    kw = {"federation__rounds": 3, "federation__options": {
        "base": "fedadam", "server_lr": 0.05, "grid": GRID, "schedule": "adaptive", "discount": 0.5}}
    whole = fedtune.run(_recipe(tiny_recipe, output__name="whole", **kw))
    original = Server.run_round

    def crash(self, round_):
        if round_ == 3:
            raise KeyboardInterrupt
        return original(self, round_)

    monkeypatch.setattr(Server, "run_round", crash)
    with pytest.raises(KeyboardInterrupt):
        fedtune.run(_recipe(tiny_recipe, output__name="cut", **kw))
    monkeypatch.setattr(Server, "run_round", original)
    resumed = fedtune.run(resume=Path(tiny_recipe()["output"]["dir"]) / "cut")
    a, b = _final(whole), _final(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["strategy"]["fedex_theta"] == whole["strategy"]["fedex_theta"]
    assert resumed["strategy"]["fedex_theta"] != [0.5, 0.5]


def test_hostile_feedback_is_refused_and_counted(tiny_recipe, monkeypatch):
    original = FedExLocal.fit

    def lying(self, ctx, global_state):
        outcome = original(self, ctx, global_state)
        if ctx.client == "client_1":   # claims another configuration than the one it was given
            outcome.metrics[CONFIG] = 1 - outcome.metrics[CONFIG]
        if ctx.client == "client_2":   # a loss no model has (finite, so only FedEx's check sees it)
            outcome.metrics[AFTER] = -0.5 if ctx.round == 1 else 5e4
        return outcome

    monkeypatch.setattr(FedExLocal, "fit", lying)
    summary = fedtune.run(_recipe(tiny_recipe, output__name="hostile"))
    assert summary["rejected_replies"] == 4            # two clients, two rounds
    fits = [e for e in _events(summary) if e["kind"] == "fit"]
    assert {e["client"] for e in fits} == {"client_0", "client_3"}
    rejected = [e for e in _events(summary) if e["kind"] == "rejected"]
    assert len(rejected) == 4 and all(e["client"] in ("client_1", "client_2") for e in rejected)


def test_fedtune_tune_searches_the_base_server_lr_around_fedex(tiny_recipe):
    pytest.importorskip("optuna")
    from fedtune.config import load_recipe
    from fedtune.tune import tune

    options = {"base": "fedadam", "server_lr": 0.01, "grid": GRID}
    data = _recipe(tiny_recipe, federation__options=options, eval__every=1, tune={
        "metric": "val_loss", "trials": 2, "sampler": "grid", "pruner": "none",
        "params": {"federation.options.server_lr": {"type": "categorical", "choices": [0.05, 1e-4]}}})
    out = tune(data)
    assert out["counts"]["complete"] == 2
    seen = {}
    for trial in sorted((Path(out["study_dir"]) / "trials").iterdir()):
        recipe = load_recipe(trial / "recipe.yaml")
        summary = json.loads((trial / "summary.json").read_text())
        seen[recipe.federation.options["server_lr"]] = summary["strategy"]["fedex_theta"]
        assert recipe.federation.options["grid"] == GRID and len(summary["strategy"]["fedex_theta"]) == 2
    assert set(seen) == {0.05, 1e-4}
    best = load_recipe(Path(out["study_dir"]) / "best.yaml")
    assert best.federation.algorithm == "fedex" and best.federation.options["server_lr"] in seen


@pytest.mark.slow   # about 3 minutes on 2 shared cores: four processes and a simulation
def test_fedex_deployed_over_grpc_equals_the_simulation(tiny_recipe, tmp_path):
    from test_grpc_deploy import _deploy, _final_checkpoint, _free_port, _simulate, _write_recipe

    port = _free_port()
    options = {"base": "fedavg", "grid": GRID, "eta": 1.0, "schedule": "constant"}
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port, federation__algorithm="fedex",
                                 federation__options=options, data__val_fraction=0.2,
                                 eval__at_start=False, eval__every=0, eval__exact_match=False)
    _deploy(tmp_path, path, port)
    deployed = json.loads((Path(recipe["output"]["dir"]) / "deployed" / "summary.json").read_text())
    simulated, expected = _simulate(recipe)
    assert deployed["rejected_replies"] == 0
    assert deployed["strategy"]["fedex_theta"] == pytest.approx(simulated["strategy"]["fedex_theta"], abs=1e-6)
    assert deployed["strategy"]["fedex_theta"] != [0.5, 0.5]
    got = _final_checkpoint(Path(recipe["output"]["dir"]) / "deployed")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
