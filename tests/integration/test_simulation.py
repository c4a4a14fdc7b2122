"""End-to-end simulated runs on a tiny model built from a config (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fedtune
from fedtune.config import load_recipe
from fedtune.errors import RunDirError
from fedtune.models.adapters import AdapterSlot
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import Simulation
from fedtune.seeding import derive_seed
from fedtune.train.local import lr_for_round


def _final_checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / "global.safetensors"))


def test_three_clients_two_rounds_leave_a_complete_run_dir(tiny_recipe):
    summary = fedtune.run(tiny_recipe())
    run_dir = Path(summary["final_adapter"]).parent

    assert summary["rounds"] == 2
    assert set(summary["final"]) >= {"loss", "perplexity", "exact_match"}
    assert summary["initial"]["loss"] > summary["final"]["loss"]  # training helped the test loss
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > summary["bytes_up"]
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "split.json", "final/adapter_config.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fits = [e for e in events if e["kind"] == "fit"]
    assert len(fits) == 2 * 3
    assert {e["client"] for e in fits} == {"client_0", "client_1", "client_2"}
    assert all(set(e) == {"round", "client", "kind", "values", "time"} for e in events)
    # Bytes are those of the encoded messages: every fit carries the whole adapter both ways.
    assert all(e["values"]["down"] > summary["adapter_bytes"] for e in fits)
    up = sum(e["values"]["up"] for e in fits)
    assert up <= summary["bytes_up"]
    evals = [e for e in events if e["kind"] == "eval" and e["client"] is None]
    assert [e["round"] for e in evals] == [0, 1, 2]

    # The recipe as run reloads to the same recipe.
    assert load_recipe(run_dir / "recipe.yaml") == load_recipe(tiny_recipe())


def test_saved_adapter_loads_with_peft_and_gives_the_same_outputs(tiny_recipe, tiny_model_dir):
    summary = fedtune.run(tiny_recipe())
    final_dir = Path(summary["final_adapter"])
    global_state = _final_checkpoint(final_dir.parent)

    recipe = load_recipe(tiny_recipe())
    sim = Simulation(recipe)
    sim.slot.set(global_state)
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    expected = sim.model(input_ids=ids).logits

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_logits = plain(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final_dir)
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    # ... and differs from the base model alone (the adapter really changed something).
    assert (base_logits - expected).abs().max() > 1e-4


def test_resume_gives_the_same_final_adapter_as_an_uninterrupted_run(tiny_recipe, monkeypatch):
    uninterrupted = fedtune.run(tiny_recipe(federation__rounds=3, output__name="whole"))
    reference = _final_checkpoint(Path(uninterrupted["final_adapter"]).parent)

    original = Server.run_round

    def crash_in_round_3(self, round_):
        if round_ == 3:
            raise KeyboardInterrupt
        return original(self, round_)

    monkeypatch.setattr(Server, "run_round", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        fedtune.run(tiny_recipe(federation__rounds=3, output__name="stopped"))
    monkeypatch.setattr(Server, "run_round", original)
    stopped = Path(tiny_recipe()["output"]["dir"]) / "stopped"
    assert not (stopped / "summary.json").exists()

    resumed = fedtune.run(resume=stopped)
    assert resumed["rounds"] == 3
    got = _final_checkpoint(stopped)
    assert got.keys() == reference.keys()
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
    assert resumed["final"] == uninterrupted["final"]
    assert resumed["bytes_down"] == uninterrupted["bytes_down"]
    # Up-messages carry timing metrics whose JSON length varies by a few bytes between runs.
    assert abs(resumed["bytes_up"] - uninterrupted["bytes_up"]) < 64
    events = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert sorted(e["round"] for e in events if e["kind"] == "round") == [1, 2, 3]


def test_one_client_one_round_equals_plain_local_training(tiny_recipe):
    raw = tiny_recipe(federation__clients=1, federation__rounds=1, data__split={"method": "iid"},
                      eval__at_start=False, output__name="fed")
    summary = fedtune.run(raw)
    federated = _final_checkpoint(Path(summary["final_adapter"]).parent)

    recipe = load_recipe(raw)
    sim = Simulation(recipe)
    client = sim.clients["client_0"]
    before = sim.slot.get()
    client.trainer.train(client.data.train, lr=lr_for_round(recipe.train, 1, 1),
                         seed=derive_seed(recipe.seed, "fit", 1, "client_0"))
    local = AdapterSlot(sim.model).get()
    assert any(not torch.equal(local[k], before[k]) for k in local)
    for name in local:
        torch.testing.assert_close(federated[name], local[name], rtol=0, atol=1e-6)


def test_an_existing_named_run_dir_is_never_overwritten(tiny_recipe):
    fedtune.run(tiny_recipe(federation__rounds=1, output__name="mine"))
    with pytest.raises(RunDirError, match="already exists"):
        fedtune.run(tiny_recipe(federation__rounds=1, output__name="mine"))


def test_unnamed_runs_get_fresh_directories(tiny_recipe):
    a = fedtune.run(tiny_recipe(federation__rounds=1, eval__clients=False))
    b = fedtune.run(tiny_recipe(federation__rounds=1, eval__clients=False))
    assert a["final_adapter"] != b["final_adapter"]
    assert a["final"] == b["final"]  # same recipe and seed, same result


def test_client_sampling_uses_only_the_chosen_clients(tiny_recipe):
    summary = fedtune.run(tiny_recipe(federation__clients=3, federation__clients_per_round=2,
                                      data__split={"method": "iid"}))
    run_dir = Path(summary["final_adapter"]).parent
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for round_ in (1, 2):
        assert len([e for e in events if e["kind"] == "fit" and e["round"] == round_]) == 2


@pytest.mark.parametrize("adapter", [
    {"method": "ia3"},
    {"method": "prompt_tuning", "options": {"num_virtual_tokens": 4}},
    {"method": "prefix_tuning", "options": {"num_virtual_tokens": 4}},
    {"method": "p_tuning", "options": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}},
    {"method": "loha", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
])
def test_other_peft_methods_by_name_through_a_round(tiny_recipe, adapter, tiny_model_dir):
    summary = fedtune.run(tiny_recipe(adapter=adapter, federation__rounds=1))
    final_dir = Path(summary["final_adapter"])
    config = json.loads((final_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == adapter["method"].upper()
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    assert "exact_match" in summary["final"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final_dir)
    assert loaded.peft_config["default"].peft_type.value == adapter["method"].upper()
