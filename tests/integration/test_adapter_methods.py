"""Every adapter method `fedtune algorithms` lists: built with its defaults on the built-in model,
one local step, saved and loaded back -- or refused when the recipe is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PeftType

from fedtune.config import FEDTUNE_METHODS, AdapterSection, ModelSection, load_recipe
from fedtune.errors import FedtuneError, ModelError, RecipeError
from fedtune.models.adapter_methods import NEEDS_OPTION, NEEDS_PACKAGE, REFUSED
from fedtune.models.adapters import (
    AdapterSlot,
    apply_bitfit,
    attach_adapter,
    default_options,
    save_adapter,
)
from fedtune.models.loading import load_base_model
from fedtune.train.loss import token_loss_sum

LISTED = sorted({*(t.lower() for t in PeftType.__members__), *FEDTUNE_METHODS})
BUILTIN = ModelSection(device="cpu")


def _refused_at_load(method: str) -> bool:
    if method in REFUSED or method in NEEDS_OPTION:
        return True
    import importlib.util

    return method in NEEDS_PACKAGE and importlib.util.find_spec(NEEDS_PACKAGE[method][0]) is None


def _batch(tokenizer):
    ids = tokenizer(["### Instruction:\nadd 2 3\n### Response:\n5"], return_tensors="pt")
    labels = ids["input_ids"].clone()
    labels[:, :-2] = -100
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": labels}


@pytest.mark.parametrize("method", LISTED)
def test_every_listed_method_runs_with_defaults_or_is_refused_at_load(method, tmp_path):
    if _refused_at_load(method):
        with pytest.raises(RecipeError) as info:
            load_recipe({"adapter": {"method": method}})
        text = str(info.value)
        assert f"'{method}'" in text and "adapter" in text
        assert "NoneType" not in text and "Traceback" not in text
        return
    load_recipe({"adapter": {"method": method}})  # accepted as it is
    if method == "qlora":  # 4-bit needs a CUDA GPU and bitsandbytes: a fedtune error without
        if torch.cuda.is_available():
            pytest.skip("covered by the GPU checks")
        with pytest.raises(FedtuneError):
            load_base_model(load_recipe({"adapter": {"method": method}}).model)
        return
    if method == "bitfit":  # the built-in Llama has no biases (a clear error); see the GPT-2 test
        model, _ = load_base_model(BUILTIN)
        with pytest.raises(ModelError, match="has none"):
            attach_adapter(model, AdapterSection(method=method))
        return
    section = AdapterSection(method=method)
    model, tokenizer = load_base_model(BUILTIN)
    torch.manual_seed(0)
    model = attach_adapter(model, section)
    slot = AdapterSlot(model)
    before = slot.get()
    batch = _batch(tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(slot.params.values(), lr=1e-2)
    loss, n_tokens = token_loss_sum(model, batch)
    assert n_tokens == 2 and torch.isfinite(loss)
    (loss / n_tokens).backward()
    optimizer.step()
    after = slot.get()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one step changed nothing"

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    save_adapter(model, section, tmp_path / "final")
    base, _ = load_base_model(BUILTIN)
    if method == "full":
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    else:
        loaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    with torch.no_grad():
        got = loaded.eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_prompt_methods_get_the_documented_number_of_virtual_tokens():
    model, _ = load_base_model(BUILTIN)
    peft_model = attach_adapter(model, AdapterSection(method="prompt_tuning"))
    # 20 virtual tokens x hidden size 128 of the built-in model
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 20 * 128
    assert default_options("prefix_tuning") == {"num_virtual_tokens": 20}
    model, _ = load_base_model(BUILTIN)
    given = attach_adapter(model, AdapterSection(method="prompt_tuning", options={"num_virtual_tokens": 4}))
    assert sum(p.numel() for p in given.parameters() if p.requires_grad) == 4 * 128


def test_c3a_and_vblora_sizes_divide_every_linear_layer():
    model, _ = load_base_model(BUILTIN)  # linear sizes 128 and 352: largest common divisor 32
    assert default_options("c3a", model) == {"block_size": 32}
    assert default_options("vblora", model) == {"vector_length": 32}


def test_adalora_is_refused_rather_than_run_as_plain_lora():
    with pytest.raises(RecipeError, match="update_and_allocate"):
        load_recipe({"adapter": {"method": "adalora"}})


def test_bitfit_saves_only_the_biases_and_loads_them_back(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    section = AdapterSection(method="bitfit")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).requires_grad_(False)
    model = attach_adapter(model, section)
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(0.5)
    save_adapter(model, section, tmp_path / "final")
    files = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert files == ["bitfit.safetensors", "bitfit_config.json"]
    size = (tmp_path / "final" / "bitfit.safetensors").stat().st_size
    # float32 biases plus a JSON header (a few hundred bytes per tensor name at most)
    assert n_bias * 4 < size < n_bias * 4 + 8192
    whole = sum(p.numel() for p in model.parameters()) * 4
    assert size < whole / 5
    assert json.loads((tmp_path / "final" / "bitfit_config.json").read_text())["method"] == "bitfit"

    fresh = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    apply_bitfit(fresh, tmp_path / "final")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
        untouched = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)(input_ids=ids).logits
    assert not torch.allclose(untouched, fresh(input_ids=ids).logits)
