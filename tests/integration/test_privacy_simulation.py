"""Simulated runs with local DP-SGD and with a backdoor attacker: what the summary and log report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtune


def _events(summary, kind):
    run_dir = Path(summary["final_adapter"]).parent
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["kind"] == kind]


def test_rounds_with_local_dp_sgd_report_each_clients_epsilon(tiny_recipe):
    pytest.importorskip("opacus")
    summary = fedtune.run(tiny_recipe(
        train__dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 0.5}, eval__every=0,
        federation__rounds=2))
    fits = _events(summary, "fit")
    assert len(fits) == 2 * 3
    by_client = {}
    for e in fits:
        v = e["values"]
        assert v["dp_noise_multiplier"] == 1.0 and v["dp_steps"] == 2 and v["dp_delta"] == 1e-5
        assert 0 < v["dp_sample_rate"] <= 1
        by_client.setdefault(e["client"], []).append(v["dp_epsilon"])
    for eps in by_client.values():
        assert 0 < eps[0] < eps[1]   # the second round adds to the client's privacy loss
    dp = summary["dp_sgd"]
    assert dp["delta"] == 1e-5
    assert {c: m["epsilon"] for c, m in dp["clients"].items()} == {c: e[-1] for c, e in by_client.items()}
    assert dp["max_epsilon"] == max(e[-1] for e in by_client.values())
    assert summary["final"]["loss"] > 0


def test_a_backdoor_run_reports_the_attack_success_rate(tiny_recipe):
    summary = fedtune.run(tiny_recipe(federation__attack={
        "clients": ["client_1"], "kind": "backdoor", "target": "ZZ", "poison_fraction": 1.0}))
    final = summary["final"]
    assert 0.0 <= final["backdoor_success"] <= 1.0
    evals = [e["values"] for e in _events(summary, "eval") if e["client"] is None]
    assert len(evals) == 3  # at start and after each of 2 rounds
    assert all("backdoor_success" in v and v["backdoor_examples"] == v["n_examples"] for v in evals)
    clean = fedtune.run(tiny_recipe(output__name="clean"))
    assert "backdoor_success" not in clean["final"]
