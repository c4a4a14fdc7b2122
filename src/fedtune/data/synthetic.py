"""The built-in synthetic instruction benchmark: short tasks in several categories, made from a seed.

Each category is a small skill on made-up words or numbers (reverse a word, add two numbers, ...).
The same skills also exist as plain "statements" (`reverse tamol = lomat`), which is the text the
shipped tiny base model was pre-trained on (scripts/build_tiny_model.py). The base model therefore
knows the skills but not the instruction format: federated instruction tuning is what connects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedtune.data.examples import Example
from fedtune.errors import DataError

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def make_word(rng: np.random.Generator, min_len: int = 3, max_len: int = 6) -> str:
    """A pronounceable made-up lowercase word (consonant-vowel pattern)."""
    length = int(rng.integers(min_len, max_len + 1))
    start = int(rng.integers(0, 2))
    letters = [
        (_CONSONANTS if (i + start) % 2 == 0 else _VOWELS)[
            int(rng.integers(0, len(_CONSONANTS if (i + start) % 2 == 0 else _VOWELS)))
        ]
        for i in range(length)
    ]
    return "".join(letters)


@dataclass(frozen=True)
class Task:
    """One category: an instruction, an operator name, and a generator of (input, answer)."""

    category: str
    instruction: str
    operator: str
    sample: Callable[[np.random.Generator], tuple[str, str]]

    def example(self, rng: np.random.Generator) -> Example:
        given, answer = self.sample(rng)
        return Example(
            instruction=self.instruction, input=given, output=answer,
            category=self.category, origin=f"synthetic:{self.category}",
        )

    def statement(self, rng: np.random.Generator) -> str:
        given, answer = self.sample(rng)
        return f"{self.operator} {given} = {answer}"


def _digits(rng: np.random.Generator, n: int) -> list[int]:
    return [int(d) for d in rng.integers(0, 10, size=n)]


def _add(rng):
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    return f"{a} {b}", str(a + b)


def _reverse(rng):
    w = make_word(rng)
    return w, w[::-1]


def _upper(rng):
    w = make_word(rng)
    return w, w.upper()


def _length(rng):
    w = make_word(rng, 2, 8)
    return w, str(len(w))


def _sort(rng):
    d = _digits(rng, int(rng.integers(3, 6)))
    return " ".join(map(str, d)), " ".join(map(str, sorted(d)))


def _max(rng):
    d = [int(x) for x in rng.integers(0, 100, size=int(rng.integers(2, 5)))]
    return " ".join(map(str, d)), str(max(d))


TASKS: dict[str, Task] = {
    t.category: t
    for t in [
        Task("add", "Add the two numbers.", "add", _add),
        Task("reverse", "Write the word backwards.", "reverse", _reverse),
        Task("upper", "Write the word in capital letters.", "upper", _upper),
        Task("length", "How many letters does the word have?", "length", _length),
        Task("sort", "Sort the digits from smallest to largest.", "sort", _sort),
        Task("max", "Which number is the largest?", "max", _max),
    ]
}


def _tasks(categories: list[str] | None) -> list[Task]:
    names = categories or list(TASKS)
    unknown = [c for c in names if c not in TASKS]
    if unknown:
        raise DataError(
            f"data.synthetic.categories: unknown {unknown}; available: {', '.join(TASKS)}"
        )
    return [TASKS[c] for c in names]


def generate_examples(section, seed: int) -> list[Example]:
    """`section.examples_per_category` distinct examples for each category, in a seeded order."""
    rng = np.random.default_rng([seed, 7919])
    out: list[Example] = []
    for task in _tasks(section.categories):
        seen: set[str] = set()
        tries = 0
        while len(seen) < section.examples_per_category:
            ex = task.example(rng)
            tries += 1
            if ex.input not in seen:
                seen.add(ex.input)
                out.append(ex)
            elif tries > 50 * section.examples_per_category:
                raise DataError(
                    f"data.synthetic.examples_per_category: category {task.category!r} has only "
                    f"{len(seen)} distinct examples; ask for fewer"
                )
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def pretraining_text(n_statements: int, seed: int, categories: list[str] | None = None) -> list[str]:
    """Plain `operator input = answer` lines for all categories, used to pre-train the tiny model."""
    rng = np.random.default_rng([seed, 104729])
    tasks = _tasks(categories)
    picks = rng.integers(0, len(tasks), size=n_statements)
    return [tasks[int(i)].statement(rng) for i in picks]
