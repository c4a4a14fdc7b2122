"""Prompt templates, tokenisation with prompt masking, truncation that keeps the response, collation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fedtune.data.examples import Example
from fedtune.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTemplate:
    """Two variants of one template: with an `### Input:`-like block, and without (empty input)."""

    with_input: str
    without_input: str


_ALPACA_HEAD = "Below is an instruction describing a task"
TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        with_input=(
            f"{_ALPACA_HEAD}, together with an input that gives more context. "
            "Write a response that completes the request appropriately.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            f"{_ALPACA_HEAD}. Write a response that completes the request appropriately.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
    "compact": PromptTemplate(
        with_input="### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n",
        without_input="### Instruction:\n{instruction}\n### Response:\n",
    ),
    "plain": PromptTemplate(
        with_input="{instruction}\n{input}\n",
        without_input="{instruction}\n",
    ),
}


def resolve_template(template: str | PromptTemplate) -> PromptTemplate:
    """A built-in template by name, or a custom string with `{instruction}` (and maybe `{input}`)."""
    if isinstance(template, PromptTemplate):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{instruction}" not in template:
        raise DataError(
            f"data.template {template!r} is neither a built-in template "
            f"({', '.join(TEMPLATES)}) nor a string containing {{instruction}}"
        )
    return PromptTemplate(with_input=template, without_input=template)


def render_prompt(example: Example, template: str | PromptTemplate, tokenizer: Any = None) -> str:
    """The prompt text for `example` (everything before the response).

    A chat example is rendered with `tokenizer`'s chat template (the fallback layout without
    one, or without a tokenizer), up to the cue for the last assistant turn.
    """
    if example.messages is not None:
        from fedtune.data.chat import chat_prompt

        return chat_prompt(example.messages, tokenizer)
    resolved = resolve_template(template)
    text = resolved.with_input if example.input else resolved.without_input
    if example.input and "{input}" not in text:
        raise DataError(
            f"{example.origin or 'an example'} has an input but data.template has no {{input}} "
            "placeholder; add {input} to data.template"
        )
    try:
        return text.format_map({"instruction": example.instruction, "input": example.input})
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(
            f"data.template: cannot fill it ({type(exc).__name__}: {exc}); only {{instruction}} "
            "and {input} are placeholders, write literal braces as {{ and }}"
        ) from None


class TokenizedExample:
    """Token ids and labels: -100 on BOS and prompt tokens, the ids on response tokens and EOS.

    Kept compact, as two int32 arrays (`ids`, `label_ids`: 4 bytes a token, not a Python int
    and a list slot each); `input_ids` and `labels` give them back as lists."""

    __slots__ = ("ids", "label_ids")

    def __init__(self, input_ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray):
        self.ids = np.asarray(input_ids, dtype=np.int32)
        self.label_ids = np.asarray(labels, dtype=np.int32)
        if self.ids.ndim != 1 or self.ids.shape != self.label_ids.shape:
            raise ValueError(f"input_ids and labels must be two flat sequences of one length, got "
                             f"shapes {self.ids.shape} and {self.label_ids.shape}")

    @property
    def input_ids(self) -> list[int]:
        return self.ids.tolist()

    @property
    def labels(self) -> list[int]:
        return self.label_ids.tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenizedExample):
            return NotImplemented
        return bool(np.array_equal(self.ids, other.ids) and np.array_equal(self.label_ids, other.label_ids))

    def __repr__(self) -> str:
        return f"TokenizedExample(input_ids={self.input_ids}, labels={self.labels})"


@dataclass
class TokenizeReport:
    """What tokenisation kept, truncated and dropped (and why)."""

    total: int
    kept: int
    truncated: int
    dropped: int
    dropped_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit(
    bos: list[int], prompt: list[int], response: list[int], max_length: int
) -> tuple[list[int], list[int]] | None:
    """Cut the prompt from the left, then the response from the right, to fit `max_length`.

    Keeps at least one prompt token (when there is one) and one response token; None if impossible.
    """
    room = max_length - len(bos) - len(response)
    if room >= min(1, len(prompt)):
        return (prompt[len(prompt) - room :] if room > 0 else []), response
    keep_prompt = min(1, len(prompt))
    keep_response = max_length - len(bos) - keep_prompt
    if keep_response < 1:
        return None
    return prompt[len(prompt) - keep_prompt :], response[:keep_response]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    template: str | PromptTemplate,
    max_length: int,
    truncation: Literal["prompt", "drop"] = "prompt",
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenise `[bos] + prompt + response + [eos]` with the prompt masked out of the labels."""
    if truncation not in ("prompt", "drop"):
        raise DataError(f"data.truncation must be 'prompt' or 'drop', got {truncation!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set one so responses can end")
    resolved = resolve_template(template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if not examples:
        return [], TokenizeReport(total=0, kept=0, truncated=0, dropped=0)

    plain = [ex for ex in examples if ex.messages is None]
    prompts = [render_prompt(ex, resolved) for ex in plain]
    responses = [ex.output for ex in plain]
    prompt_ids = iter(tokenizer(prompts, add_special_tokens=False)["input_ids"] if plain else [])
    response_ids = iter(tokenizer(responses, add_special_tokens=False)["input_ids"] if plain else [])

    out: list[TokenizedExample] = []
    reasons: Counter[str] = Counter()
    truncated = 0
    for example in examples:
        if example.messages is not None:
            from fedtune.data.chat import tokenize_chat

            input_ids, labels, reason, cut = tokenize_chat(example.messages, tokenizer,
                                                           max_length, truncation)
            truncated += cut
            if reason is not None:
                reasons[reason] += 1
            else:
                out.append(TokenizedExample(input_ids=input_ids, labels=labels))
            continue
        prompt, response = next(prompt_ids), next(response_ids)
        if not response:
            reasons["empty response"] += 1
            continue
        response = list(response) + eos
        prompt = list(prompt)
        if len(bos) + len(prompt) + len(response) > max_length:
            if truncation == "drop":
                reasons["too long"] += 1
                continue
            fitted = _fit(bos, prompt, response, max_length)
            if fitted is None:
                reasons["max_length too small"] += 1
                continue
            prompt, response = fitted
            truncated += 1
        input_ids = bos + prompt + response
        labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + response
        # The loss predicts token t from tokens < t, so the label at position 0 never counts.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            reasons["no response tokens left"] += 1
            continue
        out.append(TokenizedExample(input_ids=input_ids, labels=labels))

    report = TokenizeReport(
        total=len(examples),
        kept=len(out),
        truncated=truncated,
        dropped=sum(reasons.values()),
        dropped_reasons=dict(reasons),
    )
    return out, report


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: `input_ids` (pad_id), `attention_mask` (0 on padding), `labels` (-100)."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(ex) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex)
        input_ids[row, :n] = torch.from_numpy(ex.ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.from_numpy(ex.label_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
