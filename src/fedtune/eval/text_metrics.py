"""Per-example text metrics (exact match, Rouge-L, GSM8K answers) and a registry of them by name."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from fedtune.eval.errors import EvalError, require_module
from fedtune.eval.metrics import exact_match, last_number

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# Markers of a final answer, strongest first: GSM8K's "#### N", then FS-LLM's "The answer is N".
_MARKERS = (re.compile(r"####"), re.compile(r"the answer is", re.IGNORECASE))


@lru_cache(maxsize=2)
def _rouge_scorer(stemmer: bool) -> Any:
    module = require_module("rouge_score.rouge_scorer", "rouge-score", "the rouge_l metric")
    return module.RougeScorer(["rougeL"], use_stemmer=stemmer)


def rouge_l(prediction: str, reference: str, *, stemmer: bool = False) -> float:
    """Rouge-L F-measure (longest common subsequence of words), via the `rouge-score` package.

    rouge-score lower-cases and keeps only ASCII letters and digits, so text in other scripts
    scores 0; an empty prediction or reference scores 0.
    """
    score = _rouge_scorer(stemmer).score(reference, prediction)["rougeL"]
    return float(score.fmeasure)


def gsm8k_answer(text: str) -> str | None:
    """The final number: after the last "####", else after the last "The answer is", else the last one.

    Commas are removed and trailing decimal zeros dropped ("1,234.50" -> "1234.5", "12.0" -> "12").
    """
    for marker in _MARKERS:
        ends = [match.end() for match in marker.finditer(text)]
        if ends:
            found = _NUMBER.search(text, ends[-1])
            if found:
                return last_number(found.group())
    return last_number(text)


def _same_number(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def gsm8k_correct(prediction: str, reference: str) -> bool:
    """Whether the final numbers of prediction and reference (see `gsm8k_answer`) are equal."""
    pred, ref = gsm8k_answer(prediction), gsm8k_answer(reference)
    return pred is not None and ref is not None and _same_number(pred, ref)


MetricFn = Callable[[str, str], float]

METRICS: dict[str, MetricFn] = {
    "exact_match": lambda prediction, reference: float(exact_match(prediction, reference)),
    "rouge_l": rouge_l,
    "gsm8k": lambda prediction, reference: float(gsm8k_correct(prediction, reference)),
}


# The rule each metric applies (summary.json `eval_metrics`, `fedtune eval` output).
RULES = {
    "exact_match": "normalised texts equal (lower case, no punctuation or articles)",
    "gsm8k": "number after the last '####', else after 'The answer is', else the last number; "
             "compared numerically",
    "rouge_l": "Rouge-L F-measure (rouge-score)",
    "mc_accuracy": "multiple choice: the option letter with the highest next-token logit",
}


def get_metric(name: str) -> MetricFn:
    """The metric called `name`, or EvalError listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise EvalError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}") from None


def mean_metric(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """The mean of metric `name` over aligned predictions and references (0.0 when empty)."""
    if len(predictions) != len(references):
        raise EvalError(
            f"metric {name!r}: {len(predictions)} predictions but {len(references)} references"
        )
    metric = get_metric(name)
    scores = [metric(p, r) for p, r in zip(predictions, references)]
    return sum(scores) / len(scores) if scores else 0.0
