"""Answer normalisation and exact match for short-answer generation tasks."""

from __future__ import annotations

import re
import string

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def last_number(text: str) -> str | None:
    """The last number in the text ("The answer is 1,234." -> "1234"), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def exact_match(prediction: str, reference: str) -> bool:
    """Equality of the normalised texts (see `normalize_answer`); the one rule of `exact_match`."""
    return normalize_answer(prediction) == normalize_answer(reference)
