"""`fedtune export ADAPTER OUT --merge`: a full model with the same logits as base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.cli import main

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15]])


def _run_dir(tmp_path, model_dir, adapter_config):
    """A run directory as fedtune leaves it: recipe.yaml and final/ (an adapter, not zero)."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": model_dir, "device": "cpu"}}))
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), adapter_config)
    model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(run / "final")
    return run / "final"


def _adapted_logits(model_dir, final):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(final))
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_merged_lora_loads_alone_and_gives_the_same_logits(tiny_model_dir, tmp_path, capsys):
    # init_lora_weights=False: B is random too, so the adapter changes the output
    final = _run_dir(tmp_path, tiny_model_dir, LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path / "merged"
    assert main(["export", str(final), str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    AutoTokenizer.from_pretrained(out)  # the tokenizer is there too
    with torch.no_grad():
        got = merged.eval()(input_ids=IDS).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=IDS).logits
    expected = _adapted_logits(tiny_model_dir, final)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter matters ...
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # ... and is in the weights


def test_export_without_merge_names_the_base_and_never_overwrites(tiny_model_dir, tmp_path, capsys):
    final = _run_dir(tmp_path, tiny_model_dir, LoraConfig(r=2, target_modules=["q_proj"]))
    out = tmp_path / "adapter"
    assert main(["export", str(final), str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir
    assert main(["export", str(final), str(out), "--merge"]) == 2   # not empty: refused
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prompt_tuning"])
def test_unmergeable_method_is_a_clear_error(tiny_model_dir, tmp_path, capsys, method):
    from peft import PromptTuningConfig

    final = _run_dir(tmp_path, tiny_model_dir, PromptTuningConfig(task_type="CAUSAL_LM",
                                                                  num_virtual_tokens=4))
    assert main(["export", str(final), str(tmp_path / "m"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "cannot be merged" in err and "PROMPT_TUNING" in err


def test_merged_bitfit_is_the_base_with_the_trained_biases(tmp_path, capsys, tiny_gpt2_dir):
    from fedtune.config import AdapterSection
    from fedtune.models.adapters import attach_adapter, save_adapter

    base_dir, run = tiny_gpt2_dir, tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": str(base_dir), "device": "cpu"}}))
    model = attach_adapter(AutoModelForCausalLM.from_pretrained(base_dir).requires_grad_(False),
                           AdapterSection(method="bitfit"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.25)
    save_adapter(model, AdapterSection(method="bitfit"), run / "final")
    assert main(["export", str(run / "final"), str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, model(input_ids=IDS).logits)
