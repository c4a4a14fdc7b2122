"""The instruction example every input format is mapped to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    `origin` says where it came from ("data/train.jsonl:12"), for error messages and reports.
    `messages` holds a chat conversation (`data.format: messages`): its (role, content) turns,
    the last one the assistant's answer (also in `output`; `instruction` is the last user turn).
    `split_value` is the example's value of the column `data.split.by` names (when that is not
    `category`), the label the dirichlet and meta splits group by.
    """

    instruction: str
    output: str
    input: str = ""
    category: str | None = None
    origin: str = ""
    split_value: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
