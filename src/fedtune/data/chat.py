"""Chat data (`data.format: messages`): role/content turns rendered with the tokenizer's chat
template (or fedtune's fallback), loss on the assistant turns only."""

from __future__ import annotations

import json
from typing import Any

from fedtune.errors import DataError

ROLES = ("system", "user", "assistant")
Turns = tuple[tuple[str, str], ...]

# Without a chat template: a header per turn; an assistant turn is its content and EOS.
FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def parse_messages(value: Any, origin: str, column: str) -> Turns:
    """An OpenAI-style list of {role, content} turns, checked: roles known, contents text, the
    conversation ends with an assistant turn (the reference answer) and does not start with one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{origin}: column {column!r} must be a list of {{role, content}} "
                            "turns (or that list as JSON text)") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{origin}: column {column!r} must be a non-empty list of {{role, content}} "
                        f"turns, got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        where = f"{origin}: {column}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected an object with role and content, got {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: role {role!r} unknown; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: content must be a string, got {type(content).__name__}")
        turns.append((role, content))
    if turns[0][0] == "assistant":
        raise DataError(f"{origin}: {column} starts with an assistant turn; start with system or user")
    if turns[-1][0] != "assistant":
        raise DataError(f"{origin}: {column} must end with an assistant turn (the answer to learn)")
    return tuple(turns)


def _as_dicts(turns: Turns) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def _strip_bos(text: str, tokenizer) -> str:
    """fedtune puts BOS in front itself (as for every example); drop the template's own."""
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def _render(tokenizer, turns: Turns, *, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(_as_dicts(turns), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises TemplateError and friends from the template itself
        raise DataError(f"the tokenizer's chat template failed on a conversation ({exc})") from None
    return _strip_bos(text, tokenizer)


def chat_segments(turns: Turns, tokenizer) -> list[tuple[str, bool]]:
    """The conversation as text pieces, each with whether it carries loss (assistant turns).

    With a chat template, an assistant turn is what rendering it adds after the prompt that
    leads to it (`add_generation_prompt`), end-of-turn marks included. Without one, the fallback
    headers are used and the EOS token is added after each assistant turn by the caller.
    """
    if not getattr(tokenizer, "chat_template", None):
        segments: list[tuple[str, bool]] = []
        for role, content in turns:
            segments.append((FALLBACK_HEADERS[role] + ("" if role == "assistant" else content + "\n"), False))
            if role == "assistant":
                segments.append((content, True))
        return segments
    full = _render(tokenizer, turns, generation_prompt=False)
    segments, pos = [], 0
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _render(tokenizer, turns[:i], generation_prompt=True)
        through = _render(tokenizer, turns[: i + 1], generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as the sum of its "
                "turns (the text up to an assistant turn changes once later turns follow), so the "
                "assistant turns cannot be told apart; remove tokenizer.chat_template to use "
                "fedtune's fallback layout (docs/data.md, 'Chat data')")
        segments += [(full[pos:len(before)], False), (full[len(before):len(through)], True)]
        pos = len(through)
    segments.append((full[pos:], False))
    return [(text, loss) for text, loss in segments if text]


def chat_prompt(turns: Turns, tokenizer=None) -> str:
    """The text a model answers: every turn before the last assistant turn, then the cue for it."""
    before = turns[:-1]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return "".join(FALLBACK_HEADERS[role] + content + "\n" for role, content in before) + \
            FALLBACK_HEADERS["assistant"]
    return _render(tokenizer, before, generation_prompt=True)


def tokenize_chat(turns: Turns, tokenizer, max_length: int, truncation: str
                  ) -> tuple[list[int], list[int], str | None, bool]:
    """(input_ids, labels, why it was dropped or None, whether it was truncated).

    Labels are the ids on assistant-turn tokens, -100 elsewhere. Too long: `drop`, or (`prompt`)
    keep the last `max_length` tokens, the oldest turns going first, if a labelled token remains.
    """
    fallback = not getattr(tokenizer, "chat_template", None)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [-100] * len(ids)
    for text, loss in chat_segments(turns, tokenizer):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if loss and fallback:
            piece = [*piece, tokenizer.eos_token_id]
        ids += piece
        labels += piece if loss else [-100] * len(piece)
    truncated = False
    if len(ids) > max_length:
        if truncation == "drop":
            return [], [], "too long", False
        ids, labels, truncated = ids[-max_length:], labels[-max_length:], True
    if all(label == -100 for label in labels[1:]):
        return [], [], "no response tokens left", truncated
    return ids, labels, None, truncated
