"""The messages server and clients exchange: plain data (kind, round, names, tensors, JSON meta)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class MessageKind(str, Enum):
    """What a message asks for or answers."""

    JOIN = "join"
    FIT = "fit"
    UPDATE = "update"
    EVALUATE = "evaluate"
    EVAL_RESULT = "eval_result"
    FINISH = "finish"
    ERROR = "error"


@dataclass(frozen=True, eq=False)
class Message:
    """One message between server and a client.

    Server -> client: FIT (global adapter tensors, meta such as ``{"lr": 0.001}``),
    EVALUATE (tensors), FINISH. Client -> server: UPDATE (update tensors, meta
    ``{"n_examples": int, "metrics": {...}}``), EVAL_RESULT (meta ``n_examples``,
    ``metrics``). ``meta`` holds JSON values only: str, int, float, bool, None, lists
    and dicts with str keys. Equality is identity (tensors have no single truth value).
    """

    kind: MessageKind
    round: int
    sender: str
    receiver: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
