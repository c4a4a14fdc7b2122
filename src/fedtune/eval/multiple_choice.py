"""MMLU-style multiple choice: items, k-shot prompts, and scoring by option-letter logits or log-likelihood."""

from __future__ import annotations

import csv
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fedtune.data.records import read_rows
from fedtune.errors import DataError
from fedtune.eval.errors import EvalError

LETTERS = string.ascii_uppercase
MMLU_CSV_COLUMNS = ("question", "A", "B", "C", "D", "answer")
Mode = Literal["letter", "loglik"]


@dataclass(frozen=True)
class MCItem:
    """One question with its options and the index of the right one; `origin` names file:line."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    origin: str = ""

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def _parse_answer(given: Any, n_choices: int, origin: str) -> int:
    value = given
    if isinstance(value, bool):
        value = None
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS:
            value = LETTERS.index(text.upper())
        elif text.isdigit():
            value = int(text)
    if not isinstance(value, int) or not 0 <= value < n_choices:
        raise DataError(
            f"{origin}: answer {given!r} is neither a letter A-{LETTERS[n_choices - 1]} nor an "
            f"index 0-{n_choices - 1} of the {n_choices} choices"
        )
    return value


def mc_item_from_row(row: dict, origin: str) -> MCItem:
    """An item from {"question", "choices": [...], "answer"} or columns question, A, B, ..., answer."""
    if "choices" in row:
        choices = row["choices"]
    else:
        choices = []
        for letter in LETTERS:
            if letter not in row:
                break
            choices.append(row[letter])
    missing = [key for key in ("question", "answer") if key not in row]
    if missing or not isinstance(choices, list | tuple) or len(choices) < 2:
        raise DataError(
            f"{origin}: a multiple-choice row needs `question`, `answer` and either a `choices` "
            f"list (2 to 26 options) or columns A, B, C, D; got keys {sorted(row)}"
        )
    if len(choices) > len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{origin}: `choices` must be 2 to 26 strings, got {choices!r}")
    if not isinstance(row["question"], str):
        raise DataError(f"{origin}: `question` must be a string, got {type(row['question']).__name__}")
    return MCItem(
        question=row["question"], choices=tuple(choices),
        answer=_parse_answer(row["answer"], len(choices), origin),
        subject=str(row.get("subject") or ""), origin=origin,
    )


def _read_headerless_csv(path: Path) -> list[tuple[str, dict]]:
    """Rows of the original MMLU CSV files: no header; question, A, B, C, D, answer."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        rows = []
        for values in reader:
            if not values:
                continue
            origin = f"{path}:{reader.line_num}"
            if len(values) != len(MMLU_CSV_COLUMNS):
                raise DataError(
                    f"{origin}: expected {len(MMLU_CSV_COLUMNS)} fields "
                    f"({', '.join(MMLU_CSV_COLUMNS)}), got {len(values)}"
                )
            rows.append((origin, dict(zip(MMLU_CSV_COLUMNS, values))))
        return rows


def load_mc_items(path: str | Path, *, subject: str = "") -> list[MCItem]:
    """Items from a JSON, JSONL or CSV file (a CSV without a `question` header is MMLU's raw layout)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
        rows = read_rows(str(path)) if "question" in header else _read_headerless_csv(path)
    else:
        rows = read_rows(str(path))
    items = [mc_item_from_row(row, origin) for origin, row in rows]
    if subject:
        items = [item if item.subject else _with_subject(item, subject) for item in items]
    if not items:
        raise DataError(f"{path}: no multiple-choice items found")
    return items


def _with_subject(item: MCItem, subject: str) -> MCItem:
    return MCItem(item.question, item.choices, item.answer, subject, item.origin)


def _format_block(item: MCItem) -> str:
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def format_mc_prompt(item: MCItem, few_shot: Sequence[MCItem] = ()) -> str:
    """The MMLU prompt: a subject header, k solved examples, then the question ending in "Answer:"."""
    subject = item.subject.replace("_", " ").strip()
    header = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        if subject else ""
    )
    shots = "".join(f"{_format_block(shot)} {shot.answer_letter}\n\n" for shot in few_shot)
    return header + shots + _format_block(item)


def _prefix_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) from tokenising the joined text, split where they first differ."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    alone = tokenizer.encode(context, add_special_tokens=False)
    cut = 0
    while cut < min(len(whole), len(alone)) and whole[cut] == alone[cut]:
        cut += 1
    cut = min(cut, len(whole) - 1)  # at least one continuation token
    return whole[:cut], whole[cut:]


def _letter_query(tokenizer, prompt: str, n_choices: int) -> tuple[list[int], list[int]]:
    """Context ids and the one token per option letter that follows them (" A", " B", ...)."""
    splits = [tokenizer.encode(prompt + " " + LETTERS[i], add_special_tokens=False)
              for i in range(n_choices)]
    common = 0
    while all(len(s) > common for s in splits) and len({s[common] for s in splits}) == 1:
        common += 1
    if any(len(s) != common + 1 for s in splits):
        raise EvalError(
            "the tokenizer does not turn each option letter (' A', ' B', ...) into a single token "
            "after the prompt; score these items with mode='loglik'"
        )
    return splits[0][:common], [s[common] for s in splits]


def _forward_logits(model, sequences: list[list[int]], pad_id: int,
                    device: torch.device | str) -> torch.Tensor:
    """Next-token logits (float32) for right-padded sequences, shape (batch, time, vocab)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    return logits.float()


def _query_ids(context: list[int], targets: list[int], mode: Mode,
               max_length: int | None) -> list[int]:
    """The ids to run: the context (its last tokens if too long), plus the targets in loglik mode."""
    if mode == "loglik":
        keep = None if max_length is None else max(1, max_length - len(targets))
    else:
        keep, targets = max_length, []
    if keep is not None and len(context) > keep:
        context = context[len(context) - keep:]
    if not context:
        raise EvalError("an empty prompt cannot be scored without a BOS token; give a question")
    return context + targets


@torch.no_grad()
def choice_scores(model, tokenizer, prompts: Sequence[str], device: torch.device | str, *,
                  choices: Sequence[Sequence[str]] | None = None, mode: Mode = "letter",
                  batch_size: int = 8, max_length: int | None = None) -> list[list[float]]:
    """Per prompt, one score per option: the letter token's logit, or the option's summed log-likelihood.

    mode="letter" (MMLU harness, FS-LLM): next-token logits of " A", " B", ... after the prompt;
    `choices` only sets the number of options (default 4). mode="loglik": sum over the tokens of
    " <option text>" of their log-probability after the prompt; `choices` gives the texts.
    `max_length` keeps the last tokens of over-long contexts.
    """
    if mode not in ("letter", "loglik"):
        raise EvalError(f"unknown multiple-choice mode {mode!r}; use 'letter' or 'loglik'")
    if choices is not None and len(choices) != len(prompts):
        raise EvalError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    if mode == "loglik" and choices is None:
        raise EvalError("mode='loglik' needs the option texts: pass choices=[[...], ...]")
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    head = _prefix_ids(tokenizer)
    # One query per (prompt, option) in loglik mode, one per prompt in letter mode.
    queries: list[tuple[int, list[int], list[int]]] = []  # (prompt index, context, targets)
    for p, prompt in enumerate(prompts):
        if mode == "letter":
            n = len(choices[p]) if choices is not None else 4
            context, letter_ids = _letter_query(tokenizer, prompt, n)
            queries.append((p, head + context, letter_ids))
        else:
            for option in choices[p]:
                context, cont = _split_continuation(tokenizer, prompt, " " + option.strip())
                queries.append((p, head + context, cont))
    scores: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        seqs = [_query_ids(ctx, targets, mode, max_length) for _, ctx, targets in chunk]
        logits = _forward_logits(model, seqs, pad_id, device)
        for row, (p, _, targets) in enumerate(chunk):
            if mode == "letter":
                scores[p] = logits[row, len(seqs[row]) - 1, targets].tolist()
            else:
                first = len(seqs[row]) - len(targets) - 1  # position predicting the first target
                log_probs = torch.log_softmax(logits[row, first:first + len(targets)], dim=-1)
                picked = log_probs.gather(-1, torch.tensor(targets, device=log_probs.device)[:, None])
                scores[p].append(float(picked.sum()))
    return scores


def score_choices(model, tokenizer, prompts: Sequence[str], device: torch.device | str, *,
                  choices: Sequence[Sequence[str]] | None = None, mode: Mode = "letter",
                  batch_size: int = 8, max_length: int | None = None) -> list[str]:
    """The predicted letter per prompt: argmax of `choice_scores` (first option wins ties)."""
    scores = choice_scores(model, tokenizer, prompts, device, choices=choices, mode=mode,
                           batch_size=batch_size, max_length=max_length)
    return [LETTERS[max(range(len(row)), key=row.__getitem__)] for row in scores]


def mc_accuracy(model, tokenizer, items: Sequence[MCItem], device: torch.device | str, *,
                few_shot: Sequence[MCItem] = (), mode: Mode = "letter", batch_size: int = 8,
                max_length: int | None = None) -> dict[str, float]:
    """Accuracy on `items` with the same k-shot examples before each question."""
    if not items:
        return {"mc_accuracy": 0.0, "n_items": 0}
    prompts = [format_mc_prompt(item, few_shot) for item in items]
    predicted = score_choices(model, tokenizer, prompts, device,
                              choices=[item.choices for item in items], mode=mode,
                              batch_size=batch_size, max_length=max_length)
    hits = sum(letter == item.answer_letter for letter, item in zip(predicted, items))
    return {"mc_accuracy": hits / len(items), "n_items": len(items)}
