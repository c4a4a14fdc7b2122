"""MMLU-style items, prompts, and option scoring against brute force on a tiny Llama and a stub."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import make_char_tokenizer, make_tiny_llama
from fedtune.errors import DataError
from fedtune.eval.errors import EvalError
from fedtune.eval.multiple_choice import (
    MCItem,
    choice_scores,
    format_mc_prompt,
    load_mc_items,
    mc_accuracy,
    score_choices,
)

ITEMS = [
    MCItem("What is 2 + 2?", ("3", "4", "5", "22"), 1, subject="elementary_mathematics"),
    MCItem("Capital of France?", ("Rome", "Paris", "Berlin", "Madrid"), 1),
    MCItem("Pick the vowel.", ("b", "c", "e", "d"), 2),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return make_tiny_llama(tokenizer, max_positions=512).eval()


def test_load_items_from_jsonl_csv_and_headerless_mmlu_csv(tmp_path):
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(
        json.dumps({"question": "q1", "choices": ["a", "b", "c", "d"], "answer": "c"}) + "\n\n"
        + json.dumps({"question": "q2", "choices": ["a", "b"], "answer": 1, "subject": "x"}) + "\n"
    )
    items = load_mc_items(jsonl)
    assert [(i.answer, i.answer_letter, len(i.choices), i.subject) for i in items] == [
        (2, "C", 4, ""), (1, "B", 2, "x")]
    assert items[1].origin.endswith("items.jsonl:3")

    with_header = tmp_path / "items.csv"
    with_header.write_text("question,A,B,C,D,answer\nWhy?,w,x,y,z,D\n")
    assert load_mc_items(with_header)[0] == MCItem("Why?", ("w", "x", "y", "z"), 3,
                                                   origin=f"{with_header}:2")
    raw = tmp_path / "anatomy_test.csv"
    raw.write_text('"Which, one?",w,x,y,z,A\nSecond,1,2,3,4,B\n')
    items = load_mc_items(raw, subject="anatomy")
    assert [(i.question, i.answer, i.subject) for i in items] == [
        ("Which, one?", 0, "anatomy"), ("Second", 1, "anatomy")]


@pytest.mark.parametrize("line,message", [
    ({"question": "q", "choices": ["a", "b"], "answer": "E"}, r"bad\.jsonl:2: answer 'E'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"bad\.jsonl:2: answer 2 .* 0-1"),
    ({"question": "q", "answer": "A"}, r"bad\.jsonl:2: .*needs `question`, `answer`"),
])
def test_loader_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        load_mc_items(path)


def test_headerless_csv_with_wrong_width_names_the_line(tmp_path):
    path = tmp_path / "raw.csv"
    path.write_text("q,a,b,c,d,A\nq2,a,b,C\n")
    with pytest.raises(DataError, match=r"raw\.csv:2: expected 6 fields"):
        load_mc_items(path)


def test_format_mc_prompt_mmlu_layout():
    shot = MCItem("1 + 1?", ("1", "2"), 1)
    assert format_mc_prompt(ITEMS[0], [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics."
        "\n\n1 + 1?\nA. 1\nB. 2\nAnswer: B\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    )
    assert format_mc_prompt(ITEMS[1]).startswith("Capital of France?\nA. Rome\n")


def _logits_one(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def test_letter_scores_match_brute_force(tiny_llama, tokenizer):
    prompts = [format_mc_prompt(item) for item in ITEMS]  # different lengths: padding matters
    scores = choice_scores(tiny_llama, tokenizer, prompts, "cpu", batch_size=2)
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    for prompt, row in zip(prompts, scores):
        # char tokenizer: " A" is " " then "A", so the context ends with the space
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt + " ", add_special_tokens=False)
        expected = _logits_one(tiny_llama, ids)[-1, letters]
        assert torch.allclose(torch.tensor(row), expected, atol=1e-4)
    predicted = score_choices(tiny_llama, tokenizer, prompts, "cpu")
    assert predicted == ["ABCD"[max(range(4), key=row.__getitem__)] for row in scores]


def test_loglik_scores_match_brute_force(tiny_llama, tokenizer):
    prompts = [format_mc_prompt(item) for item in ITEMS]
    choices = [item.choices for item in ITEMS]
    scores = choice_scores(tiny_llama, tokenizer, prompts, "cpu", choices=choices, mode="loglik",
                           batch_size=3)
    for prompt, options, row in zip(prompts, choices, scores):
        context = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        for option, got in zip(options, row):
            cont = tokenizer.encode(" " + option, add_special_tokens=False)
            log_probs = torch.log_softmax(_logits_one(tiny_llama, context + cont), dim=-1)
            expected = sum(log_probs[len(context) - 1 + j, t].item() for j, t in enumerate(cont))
            assert got == pytest.approx(expected, abs=1e-4)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are the same vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        batch, time = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, time, -1).clone())


def test_stub_logits_give_the_known_letter(tokenizer):
    logits = torch.zeros(len(tokenizer))
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "ABCD"}
    logits[ids["A"]], logits[ids["B"]], logits[ids["C"]], logits[ids["D"]] = 1.0, 2.0, 5.0, -1.0
    logits[tokenizer.convert_tokens_to_ids("x")] = 9.0  # not a letter: must be ignored
    model = FixedLogits(logits)
    assert choice_scores(model, tokenizer, ["Q?\nAnswer:"], "cpu") == [[1.0, 2.0, 5.0, -1.0]]
    items = [ITEMS[0], MCItem("q", ("a", "b", "c", "d"), 2)]
    assert score_choices(model, tokenizer, [format_mc_prompt(i) for i in items], "cpu") == ["C", "C"]
    assert mc_accuracy(model, tokenizer, items, "cpu") == {"mc_accuracy": 0.5, "n_items": 2}
    # loglik: every token scores log_softmax(logits); the option "C" (one extra token) is best
    loglik = score_choices(model, tokenizer, ["q"], "cpu", choices=[["Ax", "C", "xD", "B"]],
                           mode="loglik")
    assert loglik == ["B"]


def test_bad_arguments_raise_eval_errors(tokenizer):
    model = FixedLogits(torch.zeros(len(tokenizer)))
    with pytest.raises(EvalError, match="needs the option texts"):
        score_choices(model, tokenizer, ["q"], "cpu", mode="loglik")
    with pytest.raises(EvalError, match="unknown multiple-choice mode"):
        score_choices(model, tokenizer, ["q"], "cpu", mode="bits")
    assert mc_accuracy(model, tokenizer, [], "cpu") == {"mc_accuracy": 0.0, "n_items": 0}
