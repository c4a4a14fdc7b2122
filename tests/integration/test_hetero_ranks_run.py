"""Heterogeneous LoRA ranks through whole simulated runs: each client's bytes follow its rank,
a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedtune
from conftest import final_global as _final
from conftest import stop_and_resume

RANKS = [1, 2, 4]


def _recipe(tiny_recipe, algorithm, **kw):
    return tiny_recipe(eval__at_start=False, eval__every=0, eval__clients=False, eval__exact_match=False,
                       federation__algorithm=algorithm, adapter__rank_per_client=RANKS,
                       federation__rounds=3, **kw)


def _events(summary) -> list[dict]:
    run_dir = Path(summary["final_adapter"]).parent
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["hetlora", "flora", pytest.param("flexlora", marks=pytest.mark.slow)])
def test_mixed_ranks_resume_exactly_and_pay_by_rank(tiny_recipe, monkeypatch, algorithm):
    whole_summary = fedtune.run(_recipe(tiny_recipe, algorithm, output__name="whole"))
    whole = _final(whole_summary)
    fits = [e for e in _events(whole_summary) if e["kind"] == "fit" and e["round"] == 1]
    up = {e["client"]: e["values"]["up"] for e in fits}
    down = {e["client"]: e["values"]["down"] for e in fits}
    assert up["client_0"] < up["client_1"] < up["client_2"]       # ranks 1 < 2 < 4
    assert down["client_0"] < down["client_1"] < down["client_2"]
    # the LoRA bytes grow linearly in the rank: (4 − 2) = 2·(2 − 1) components, up to headers
    assert abs((up["client_2"] - up["client_1"]) - 2 * (up["client_1"] - up["client_0"])) < 200
    a_shapes = {k: v.shape for k, v in whole.items() if ".lora_A." in k}
    assert {s[0] for s in a_shapes.values()} == {4}                 # the global keeps the largest rank
    if algorithm == "flora":  # the merged delta only goes down: uploads are the factors alone
        round1 = next(e for e in _events(whole_summary) if e["kind"] == "round" and e["round"] == 1)
        assert round1["values"]["flora_stacked_rank"] == sum(RANKS)
        deltas = {k: v for k, v in whole.items() if k.startswith("down/flora/")}
        assert deltas and all(v.abs().max() > 0 for v in deltas.values())
        dense = sum(v.numel() * 4 for v in deltas.values())
        assert down["client_0"] > dense > up["client_2"]
        assert all(float(v.abs().max()) == 0 for k, v in whole.items() if ".lora_B." in k)  # fresh B
    resumed = _final(stop_and_resume(monkeypatch, _recipe(tiny_recipe, algorithm, output__name="cut"), at_round=3))
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0, msg=k)
