"""Shared test helpers: a tiny character-level tokenizer (one token per character, no download)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_char_tokenizer(*, bos: bool = True) -> PreTrainedTokenizerFast:
    """Every printable ASCII character is one token; ids 0-3 are pad, unk, bos, eos."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(string.printable)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    specials = {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "</s>"}
    if bos:
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def make_tiny_llama(tokenizer, max_positions: int = 256, layers: int = 2):
    """A randomly initialised (seed 0) Llama of `layers` layers, hidden 16, sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def char_tokenizer_no_bos() -> PreTrainedTokenizerFast:
    return make_char_tokenizer(bos=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama (hidden 16) with the character tokenizer, on disk."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_char_tokenizer()
    make_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def four_layer_dir(tmp_path_factory) -> str:
    """The tiny Llama with 4 layers (offsite-tuning needs adapter layers around a core), on disk."""
    path = tmp_path_factory.mktemp("tiny-llama-4")
    tokenizer = make_char_tokenizer()
    make_tiny_llama(tokenizer, layers=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_recipe(tiny_model_dir, tmp_path):
    """A fast recipe on the tiny model and a small synthetic benchmark, writing under tmp_path."""

    def make(**overrides):
        base = {
            "name": "test",
            "seed": 3,
            "model": {"name": tiny_model_dir},
            "data": {"source": "synthetic", "synthetic": {"examples_per_category": 12},
                     "template": "compact", "max_length": 128, "test_fraction": 0.2,
                     "val_fraction": 0.0, "split": {"method": "meta"}},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "federation": {"clients": 3, "rounds": 2},
            "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01},
            "eval": {"every": 1, "max_new_tokens": 3, "batch_size": 32},
            "output": {"dir": str(tmp_path / "runs"), "progress": False, "checkpoint_every": 1},
        }
        for key, value in overrides.items():
            node = base
            parts = key.split("__")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return base

    return make


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (it has biases, unlike Llama) with the character tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = make_char_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=256,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
                    ).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def final_global(summary: dict) -> dict[str, torch.Tensor]:
    """The global state of a run's last round checkpoint (adapter and strategy tensors)."""
    run_dir = Path(summary["final_adapter"]).parent
    return load_file(str(sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "global.safetensors"))


def stop_and_resume(monkeypatch, recipe: dict, at_round: int) -> dict:
    """Run `recipe` until a KeyboardInterrupt at the start of round `at_round`, then resume the
    stopped run directory; returns the resumed run's summary."""
    from fedtune import run
    from fedtune.runtime.server import Server

    original = Server.run_round

    def stop(self, round_):
        if round_ == at_round:
            raise KeyboardInterrupt
        return original(self, round_)

    monkeypatch.setattr(Server, "run_round", stop)
    with pytest.raises(KeyboardInterrupt):
        run(recipe)
    monkeypatch.setattr(Server, "run_round", original)
    return run(resume=Path(recipe["output"]["dir"]) / recipe["output"]["name"])


class LossEvaluator:
    """The mean cross-entropy of each example's first labelled token (position 0 predicts token
    1's label) under the model as it is now: an evaluator small enough to check by hand."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def evaluate(self, tokenized, raw, with_generation, predictions=None):
        return {"loss": self.loss(tokenized)["loss"], "n_examples": len(tokenized)}

    def loss(self, tokenized):
        total = 0.0
        for ex in tokenized:
            logits = self.model(torch.tensor([ex.input_ids])).logits[0, 0].detach()
            total += float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([ex.labels[1]])))
        return {"loss": total / len(tokenized), "n_tokens": len(tokenized)}
