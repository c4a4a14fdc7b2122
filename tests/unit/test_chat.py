"""Chat data: messages rows, the chat template (one the test builds) or the fallback, and loss
on assistant turns only (checked token by token on a one-character-per-token tokenizer)."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import make_char_tokenizer
from fedtune.data.chat import parse_messages
from fedtune.data.examples import Example
from fedtune.data.prompts import IGNORE_INDEX, render_prompt, tokenize_examples
from fedtune.data.records import load_examples
from fedtune.errors import DataError

# Each turn is "<first letter of the role, upper case>:" + content + EOS; the cue is "A:".
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] | upper }}:{{ m['content'] }}"
            "</s>{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
TURNS = (("system", "be"), ("user", "hi"), ("assistant", "yo"), ("user", "ok"), ("assistant", "ab"))


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = make_char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _example(turns=TURNS) -> Example:
    return Example(instruction="ok", output=turns[-1][1], messages=turns, origin="t:1")


def _chars(tok, text: str) -> list[int]:
    return [tok.convert_tokens_to_ids(c) for c in text]


def test_template_loss_is_on_assistant_turns_and_their_end_marks(chat_tokenizer):
    tok = chat_tokenizer
    [ex], report = tokenize_examples([_example()], tok, template="alpaca", max_length=100)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # <s> S:be</s> U:hi</s> A: | yo</s> | U:ok</s> A: | ab</s>
    expected_ids = ([bos] + _chars(tok, "S:be") + [eos] + _chars(tok, "U:hi") + [eos]
                    + _chars(tok, "A:") + _chars(tok, "yo") + [eos]
                    + _chars(tok, "U:ok") + [eos] + _chars(tok, "A:") + _chars(tok, "ab") + [eos])
    assert ex.input_ids == expected_ids
    learned = [i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX]
    # positions: 1 + 5 + 5 + 2 = 13 -> "yo</s>" at 13, 14, 15; then 5 + 2 more -> "ab</s>" at 23-25
    assert learned == [13, 14, 15, 23, 24, 25]
    assert [ex.labels[i] for i in learned] == [*_chars(tok, "yo"), eos, *_chars(tok, "ab"), eos]
    assert report.kept == 1 and report.dropped == 0


def test_template_prompt_for_generation_ends_with_the_cue(chat_tokenizer):
    text = render_prompt(_example(), "alpaca", chat_tokenizer)
    assert text == "S:be</s>U:hi</s>A:yo</s>U:ok</s>A:"   # BOS is put in front by the caller


def test_fallback_layout_without_a_chat_template():
    tok = make_char_tokenizer()
    assert not tok.chat_template
    [ex], _ = tokenize_examples([_example(TURNS[1:3])], tok, template="alpaca", max_length=100)
    prompt = "### User:\nhi\n### Assistant:\n"
    assert ex.input_ids == [tok.bos_token_id] + _chars(tok, prompt) + _chars(tok, "yo") + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * (1 + len(prompt)) + _chars(tok, "yo") + [tok.eos_token_id]
    assert render_prompt(_example(), "alpaca") == (
        "### System:\nbe\n### User:\nhi\n### Assistant:\nyo\n### User:\nok\n### Assistant:\n")


def test_too_long_conversations_lose_their_oldest_turns_or_are_dropped(chat_tokenizer):
    [ex], report = tokenize_examples([_example()], chat_tokenizer, template="alpaca", max_length=8)
    # the last 8 tokens: "ok</s>A:ab</s>" -> k, </s>, A, :, a, b, </s> and the "o" before them
    assert len(ex.input_ids) == 8 and report.truncated == 1
    assert [label != IGNORE_INDEX for label in ex.labels] == [False] * 5 + [True] * 3
    kept, report = tokenize_examples([_example()], chat_tokenizer, template="alpaca",
                                     max_length=8, truncation="drop")
    assert kept == [] and report.dropped_reasons == {"too long": 1}


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    # marks the last message specially, so the text before a turn changes when more follow
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}!{% endif %}{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(DataError, match="cannot be told apart"):
        tokenize_examples([_example()], tok, template="alpaca", max_length=100)


def test_messages_rows_load_and_are_detected(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "topic": "math"},
            {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                          {"role": "assistant", "content": "ciao"}], "topic": "talk"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(str(path), format="auto", fields={"category": "topic"})
    assert [ex.output for ex in examples] == ["4", "ciao"]
    assert [ex.instruction for ex in examples] == ["2+2?", "bye"]
    assert [ex.category for ex in examples] == ["math", "talk"]
    assert examples[1].messages[2] == ("assistant", "hello") and len(examples[1].messages) == 5


@pytest.mark.parametrize(("value", "message"), [
    ([{"role": "user", "content": "q"}], "must end with an assistant turn"),
    ([{"role": "assistant", "content": "a"}], "starts with an assistant turn"),
    ([{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}], r"messages\[0\]: role 'bot'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "content must be a string"),
    ("not json", "list of"),
    ([], "non-empty list"),
])
def test_bad_conversations_name_the_row_and_the_turn(value, message):
    with pytest.raises(DataError, match=message) as info:
        parse_messages(value, "chat.jsonl:7", "messages")
    assert "chat.jsonl:7" in str(info.value)
