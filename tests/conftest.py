"""Shared test helpers: a tiny character-level tokenizer (one token per character, no download)."""

from __future__ import annotations

import string

import pytest
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


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def char_tokenizer_no_bos() -> PreTrainedTokenizerFast:
    return make_char_tokenizer(bos=False)
