"""FedSP through whole simulated runs: only prompts travel after the one auxiliary-model download,
both models are evaluated, a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fedtune
from conftest import final_global as _final
from conftest import stop_and_resume


def _recipe(tiny_recipe, four_layer_dir, **kw):
    return tiny_recipe(model__name=four_layer_dir, eval__at_start=False, eval__every=0, eval__clients=False,
                       adapter={"method": "prefix_tuning",
                                "options": {"num_virtual_tokens": 3, "prefix_projection": True,
                                            "encoder_hidden_size": 8}},
                       federation__algorithm="fedsp", federation__rounds=3,
                       federation__options={"distill": {"steps": 3}, "server_steps": 1}, **kw)


def _run_dir(summary) -> Path:
    return Path(summary["final_adapter"]).parent


def test_fedsp_sends_only_prompts_evaluates_both_models_and_resumes_exactly(tiny_recipe, four_layer_dir,
                                                                            monkeypatch):
    summary = fedtune.run(_recipe(tiny_recipe, four_layer_dir, output__name="whole"))
    info = summary["fedsp"]
    assert info["aux_package_bytes"] < info["full_model_bytes"]
    events = [json.loads(x) for x in (_run_dir(summary) / "metrics.jsonl").read_text().splitlines()]
    last = [e["values"] for e in events if e["kind"] == "eval" and e["values"].get("scope") == "global"][-1]
    assert last["loss"] == summary["final"]["loss"] and last["aux_loss"] == info["aux_final"]["loss"]
    assert last["loss"] != last["aux_loss"]          # two models measured
    fits = [e for e in events if e["kind"] == "fit"]
    prompt_bytes = info["prompt_bytes"]
    assert fits and all(prompt_bytes < e["values"]["up"] < prompt_bytes + 4096 for e in fits)
    assert all(prompt_bytes < e["values"]["down"] < prompt_bytes + 4096 for e in fits)
    rounds = sum(e["values"]["bytes_down"] for e in events if e["kind"] == "round")
    download = (summary["bytes_down"] - rounds) / 3     # round 0: each client's one download
    assert info["aux_package_bytes"] < download < info["aux_package_bytes"] + 16384
    whole = _final(summary)
    assert all(k.startswith("prompt_encoder.") for k in whole)
    resumed = _final(stop_and_resume(monkeypatch, _recipe(tiny_recipe, four_layer_dir, output__name="cut"), at_round=3))
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0, msg=k)
