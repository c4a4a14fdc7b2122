"""Personalised FL through whole simulated runs on the tiny Llama: the pFL-Bench summary in
summary.json and the closing table, holdout (unseen) clients that never train, the personal
adapter kept per client on the shared model, and secure aggregation with a split adapter."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import fedtune


def _events(summary, kind):
    path = Path(summary["final_adapter"]).parent / "metrics.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["kind"] == kind]


@pytest.mark.parametrize("algorithm", ["ditto", "fedsa_lora"])
def test_personal_run_reports_pfl_bench_figures_and_unseen_clients(tiny_recipe, algorithm):
    recipe = tiny_recipe(federation__algorithm=algorithm, federation__clients=4,
                         federation__holdout_clients=["client_1"], federation__holdout_steps=2,
                         eval__at_start=False, eval__every=0, eval__exact_match=True,
                         output__name=algorithm)
    summary = fedtune.run(recipe)
    fits = {e["client"] for e in _events(summary, "fit")}
    assert fits == {"client_0", "client_2", "client_3"}          # the holdout client never trains
    per_client = summary["per_client"]
    assert set(per_client) == {"client_0", "client_1", "client_2", "client_3"}
    for m in per_client.values():
        assert "personal_loss" in m and "personal_exact_match" in m
    pfl = summary["pfl"]
    seen = ["client_0", "client_2", "client_3"]
    losses = [per_client[c]["personal_loss"] for c in seen]
    weights = [per_client[c]["n_examples"] for c in seen]
    figures = pfl["participating"]["personal"]["loss"]
    assert figures["mean"] == pytest.approx(sum(v * w for v, w in zip(losses, weights)) / sum(weights))
    assert figures["std"] == pytest.approx(statistics.pstdev(losses))
    assert figures["bottom_10"] == max(losses)                  # 3 clients: index 0 of worst first
    assert figures["clients"] == 3
    unseen = pfl["unseen"]["personal"]["loss"]
    assert unseen["mean"] == pytest.approx(per_client["client_1"]["personal_loss"])
    assert pfl["gap"]["personal"]["loss"] == pytest.approx(unseen["mean"] - figures["mean"])
    assert summary["holdout_clients"] == ["client_1"]
    if algorithm == "fedsa_lora":   # only A travels (r x 16 of the r x 16 + 16 x r per module)
        half = summary["adapter_bytes"] // 2
        ups = {e["values"]["up"] for e in _events(summary, "fit")}
        assert len(ups) == 1 and half < ups.pop() < half + 2048     # tensors plus the JSON header


def test_closing_table_shows_personal_rows_and_summary(tiny_recipe, capsys):
    from rich.console import Console

    from fedtune.track.report import closing_table

    summary = fedtune.run(tiny_recipe(federation__algorithm="fedavg_ft", federation__options={"ft_steps": 1},
                                      federation__attack={"kind": "backdoor", "clients": ["client_0"]},
                                      eval__at_start=False, eval__every=0, output__name="ft"))
    for m in summary["per_client"].values():   # the backdoor measured on every client's models
        assert 0.0 <= m["backdoor_success"] <= 1.0 and 0.0 <= m["personal_backdoor_success"] <= 1.0
    assert "backdoor_success" in summary["pfl"]["participating"]["personal"]
    console = Console(width=200, record=True)
    console.print(closing_table(summary))
    text = console.export_text()
    assert "participating clients: weighted mean" in text and "bottom 10 %" in text
    assert text.count("personal") >= 3 + 3       # one row per client, three summary rows


def test_secure_aggregation_with_a_split_adapter(tiny_recipe):
    summary = fedtune.run(tiny_recipe(federation__algorithm="fedsa_lora", federation__secure_aggregation={"enabled": True},
                                      eval__at_start=False, eval__every=0, output__name="sa"))
    assert summary["pfl"]["participating"]["personal"]["loss"]["clients"] == 3
