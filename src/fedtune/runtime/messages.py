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
    EMULATOR = "emulator"  # offsite-tuning: the emulator package a client downloads once (Fetch)
    # Secure aggregation (runtime/secure_round.py), request -> answer, in protocol order:
    SECAGG_FIT = "secagg_fit"          # global adapter + round parameters -> SECAGG_ADVERT (keys)
    SECAGG_ADVERT = "secagg_advert"
    SECAGG_KEYS = "secagg_keys"        # every client's public keys -> SECAGG_SHARES (sealed)
    SECAGG_SHARES = "secagg_shares"
    SECAGG_ROUTED = "secagg_routed"    # the shares sealed for this client -> SECAGG_MASKED
    SECAGG_MASKED = "secagg_masked"
    SECAGG_UNMASK = "secagg_unmask"    # survivors and dropped clients -> SECAGG_REVEAL (shares)
    SECAGG_REVEAL = "secagg_reveal"


SECAGG_ANSWERS = {
    MessageKind.SECAGG_FIT: MessageKind.SECAGG_ADVERT,
    MessageKind.SECAGG_KEYS: MessageKind.SECAGG_SHARES,
    MessageKind.SECAGG_ROUTED: MessageKind.SECAGG_MASKED,
    MessageKind.SECAGG_UNMASK: MessageKind.SECAGG_REVEAL,
}


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
