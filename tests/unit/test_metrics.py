"""Answer normalisation and exact match."""

from __future__ import annotations

import pytest

from fedtune.eval.metrics import exact_match, last_number, normalize_answer


@pytest.mark.parametrize("text,expected", [
    ("  The Answer, is: 42! ", "answer is 42"),
    ("An apple", "apple"),
    ("TAMOL", "tamol"),
    ("1 2 3", "1 2 3"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is 1,234.", "1234"), ("3 then -7", "-7"), ("2.50 dollars", "2.5"), ("none", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_exact_match_compares_whole_normalised_answers():
    assert exact_match("Lomat.", "lomat")
    assert not exact_match("lomat x", "lomat")
    assert not exact_match("so it is 12", "The answer is 12.")  # numbers are the gsm8k metric's job
