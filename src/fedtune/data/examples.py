"""The instruction example every input format is mapped to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    `origin` says where it came from ("data/train.jsonl:12"), for error messages and reports.
    """

    instruction: str
    output: str
    input: str = ""
    category: str | None = None
    origin: str = ""
