"""The shipped tiny base model: loads offline, knows its skills as statements, not as instructions."""

from __future__ import annotations

import json
from importlib import resources

import torch

from fedtune.config import ModelSection
from fedtune.models.loading import load_base_model, resolve_model_path


def test_builtin_tiny_loads_with_its_character_tokenizer():
    model, tokenizer = load_base_model(ModelSection(name="builtin:tiny"))
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    text = "reverse tamol = lomat\n### Response:"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert all(not p.requires_grad for p in model.parameters())


def test_builtin_tiny_was_built_by_the_committed_script_and_knows_the_skills():
    info = json.loads((resources.files("fedtune") / "assets" / "tiny" / "build_info.json").read_text())
    assert info["built_by"] == "scripts/build_tiny_model.py"
    model, tokenizer = load_base_model(ModelSection(name="builtin:tiny"))
    prompt = [tokenizer.bos_token_id] + tokenizer.encode("upper tamol = ", add_special_tokens=False)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, len(prompt):]).startswith("TAMOL")


def test_resolve_model_path_leaves_paths_and_hub_ids_alone():
    assert resolve_model_path("org/model") == "org/model"
    assert resolve_model_path("builtin:tiny").endswith("tiny")
