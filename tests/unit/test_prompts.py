"""Prompt rendering, label masking, truncation policies and collation (char tokenizer: 1 char = 1 id)."""

from __future__ import annotations

import pytest
import torch

from fedtune.data.examples import Example
from fedtune.data.prompts import (
    TEMPLATES,
    TokenizedExample,
    collate,
    render_prompt,
    tokenize_examples,
)
from fedtune.errors import DataError

BOS, EOS, PAD = 2, 3, 0


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_render_builtin_templates():
    with_input = Example(instruction="Sum.", input="2 3", output="5")
    without = Example(instruction="Sum.", output="5")
    assert (
        render_prompt(with_input, "compact")
        == "### Instruction:\nSum.\n### Input:\n2 3\n### Response:\n"
    )
    assert render_prompt(without, "compact") == "### Instruction:\nSum.\n### Response:\n"
    assert render_prompt(with_input, "plain") == "Sum.\n2 3\n"
    assert render_prompt(without, "plain") == "Sum.\n"
    alpaca_in = render_prompt(with_input, "alpaca")
    alpaca_no = render_prompt(without, "alpaca")
    assert alpaca_in.startswith("Below is an instruction")
    assert "### Input:\n2 3\n\n" in alpaca_in
    assert "### Input" not in alpaca_no
    assert alpaca_in.endswith("### Response:\n") and alpaca_no.endswith("### Response:\n")
    assert set(TEMPLATES) >= {"alpaca", "compact", "plain"}


def test_custom_template():
    ex = Example(instruction="Sum.", input="2 3", output="5")
    assert render_prompt(ex, "Q: {instruction} [{input}]\nA: ") == "Q: Sum. [2 3]\nA: "
    with pytest.raises(DataError, match="data.template"):
        render_prompt(ex, "Question: {question}")
    with pytest.raises(DataError, match=r"has no \{input\}"):
        render_prompt(ex, "Q: {instruction}\nA: ")
    with pytest.raises(DataError, match="data.template"):
        render_prompt(ex, "{instruction} {other}")


def test_labels_mask_bos_and_prompt_exactly(char_tokenizer):
    ex = Example(instruction="Hi", output="yo")
    [tok], report = tokenize_examples(
        [ex], char_tokenizer, template="compact", max_length=512, truncation="prompt"
    )
    prompt = ids(char_tokenizer, "### Instruction:\nHi\n### Response:\n")
    response = ids(char_tokenizer, "yo")
    assert tok.input_ids == [BOS, *prompt, *response, EOS]
    assert tok.labels == [-100] * (1 + len(prompt)) + response + [EOS]
    assert report.as_dict() == {
        "total": 1,
        "kept": 1,
        "truncated": 0,
        "dropped": 0,
        "dropped_reasons": {},
    }


def test_no_bos_tokenizer(char_tokenizer_no_bos):
    ex = Example(instruction="Hi", output="yo")
    [tok], _ = tokenize_examples(
        [ex], char_tokenizer_no_bos, template="plain", max_length=64, truncation="prompt"
    )
    assert tok.input_ids == [*ids(char_tokenizer_no_bos, "Hi\nyo"), EOS]
    assert tok.labels == [-100, -100, -100, *ids(char_tokenizer_no_bos, "yo"), EOS]


def test_truncation_cuts_prompt_from_left(char_tokenizer):
    ex = Example(instruction="abcdefghij", output="xyz")  # plain: prompt "abcdefghij\n" = 11 tokens
    [tok], report = tokenize_examples(
        [ex], char_tokenizer, template="plain", max_length=10, truncation="prompt"
    )
    prompt = ids(char_tokenizer, "abcdefghij\n")
    # 10 = bos + 5 prompt tokens + 3 response + eos; the kept prompt is the tail of the original
    assert tok.input_ids == [BOS, *prompt[-5:], *ids(char_tokenizer, "xyz"), EOS]
    assert tok.labels == [-100] * 6 + ids(char_tokenizer, "xyz") + [EOS]
    assert len(tok.input_ids) == 10
    assert report.truncated == 1 and report.kept == 1


def test_truncation_cuts_response_when_prompt_cannot_shrink_enough(char_tokenizer):
    ex = Example(instruction="prompt", output="a long response")
    [tok], report = tokenize_examples(
        [ex], char_tokenizer, template="plain", max_length=6, truncation="prompt"
    )
    # bos + the last prompt token ("\n") + the first 4 response tokens
    assert tok.input_ids == [BOS, *ids(char_tokenizer, "\n"), *ids(char_tokenizer, "a lo")]
    assert tok.labels == [-100, -100, *ids(char_tokenizer, "a lo")]
    assert report.truncated == 1


@pytest.mark.parametrize("max_length", [3, 4, 5, 8, 13, 20])
def test_truncation_always_keeps_a_response_label(char_tokenizer, max_length):
    examples = [
        Example(instruction="a" * 30, output="b"),
        Example(instruction="q", output="c" * 30),
        Example(instruction="d" * 25, input="e" * 9, output="f" * 25),
    ]
    out, report = tokenize_examples(
        examples, char_tokenizer, template="compact", max_length=max_length, truncation="prompt"
    )
    assert report.kept == 3 and report.dropped == 0
    for tok in out:
        assert len(tok.input_ids) <= max_length
        assert tok.input_ids[0] == BOS and tok.labels[0] == -100
        assert tok.labels[1] == -100  # at least one prompt token stays
        assert any(label != -100 for label in tok.labels[1:])
        n_prompt = tok.labels.index(next(x for x in tok.labels if x != -100))
        assert tok.labels[n_prompt:] == tok.input_ids[n_prompt:]


def test_max_length_too_small_drops(char_tokenizer):
    out, report = tokenize_examples(
        [Example(instruction="q", output="answer")],
        char_tokenizer,
        template="plain",
        max_length=2,
        truncation="prompt",
    )
    assert out == []
    assert report.dropped_reasons == {"max_length too small": 1}


def test_drop_policy_and_report_counts(char_tokenizer):
    examples = [
        Example(instruction="short", output="ok"),  # 1 + 6 + 2 + 1 = 10 tokens
        Example(instruction="much longer prompt", output="ok"),  # 23 tokens
        Example(instruction="empty", output=""),
        Example(instruction="x", output="y"),  # 5 tokens
    ]
    out, report = tokenize_examples(
        examples, char_tokenizer, template="plain", max_length=10, truncation="drop"
    )
    assert [len(t.input_ids) for t in out] == [10, 5]
    assert report.as_dict() == {
        "total": 4,
        "kept": 2,
        "truncated": 0,
        "dropped": 2,
        "dropped_reasons": {"too long": 1, "empty response": 1},
    }
    assert report.kept + report.dropped == report.total


def test_missing_eos_rejected(char_tokenizer_no_bos):
    class NoEos:
        bos_token_id = None
        eos_token_id = None

    with pytest.raises(DataError, match="EOS"):
        tokenize_examples(
            [Example(instruction="q", output="a")], NoEos(), template="plain", max_length=8
        )


def test_collate_right_pads():
    batch = [
        TokenizedExample(input_ids=[2, 10, 11, 3], labels=[-100, -100, 11, 3]),
        TokenizedExample(input_ids=[2, 12, 3], labels=[-100, 12, 3]),
    ]
    out = collate(batch, pad_id=PAD)
    assert out["input_ids"].tolist() == [[2, 10, 11, 3], [2, 12, 3, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, 11, 3], [-100, 12, 3, -100]]
    assert all(t.dtype == torch.int64 for t in out.values())
