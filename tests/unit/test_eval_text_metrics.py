"""Rouge-L, GSM8K answer extraction and the metric registry on hand-made examples."""

from __future__ import annotations

import sys

import pytest

from fedtune.eval import text_metrics
from fedtune.eval.errors import EvalError
from fedtune.eval.text_metrics import (
    METRICS,
    get_metric,
    gsm8k_answer,
    gsm8k_correct,
    mean_metric,
    rouge_l,
)


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dog", "the cat sat") == 0.0
    # LCS "the cat the" = 3 words; precision 3/4, recall 3/6 -> F = 2PR/(P+R) = 0.6
    assert rouge_l("the cat and the", "the cat sat on the mat") == pytest.approx(0.6)
    assert rouge_l("", "anything") == 0.0


def test_rouge_l_missing_package_names_the_extra(monkeypatch):
    text_metrics._rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # `import rouge_score` -> ImportError
    monkeypatch.delitem(sys.modules, "rouge_score.rouge_scorer", raising=False)
    try:
        with pytest.raises(EvalError, match=r"needs the `rouge-score` package.*fedtune\[eval\]"):
            rouge_l("a", "a")
    finally:
        text_metrics._rouge_scorer.cache_clear()


@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("so 3 + 4 = 7. The answer is 12.0 apples, not 5", "12"),
    ("The answer is $1,250.50.", "1250.5"),
    ("#### 5\nThe answer is 6", "5"),
    ("first 3 then -7", "-7"),
    ("the answer is unclear, maybe 9", "9"),
    ("no digits here", None),
])
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_gsm8k_correct():
    assert gsm8k_correct("We get 70 + 2. The answer is 72.", "blah\n#### 72")
    assert gsm8k_correct("The answer is 72.00", "The answer is 72")
    assert gsm8k_correct("#### 007", "7")
    assert not gsm8k_correct("The answer is 71", "#### 72")
    assert not gsm8k_correct("I do not know", "#### 72")


def test_registry_and_mean():
    assert set(METRICS) == {"exact_match", "rouge_l", "gsm8k"}
    assert get_metric("exact_match")("The Lomat!", "lomat") == 1.0
    assert mean_metric("gsm8k", ["The answer is 3", "4"], ["#### 3", "#### 5"]) == 0.5
    assert mean_metric("rouge_l", [], []) == 0.0
    with pytest.raises(EvalError, match="known metrics: exact_match, rouge_l, gsm8k"):
        get_metric("bleu")
    with pytest.raises(EvalError, match="2 predictions but 1 references"):
        mean_metric("exact_match", ["a", "b"], ["a"])
