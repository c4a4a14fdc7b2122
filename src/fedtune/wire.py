"""The wire's data types, below every package that sends or checks messages: Message and
MessageKind, TensorSpec, and the codec's byte layout (the constants and the parsed head).

`transport/` encodes and moves these, `runtime/` and `algorithms/` build and check them; none of
them imports another for a type. The encoding itself (every check on decode) is
`fedtune.transport.codec`, the one owner of the byte layout described here.
"""

from __future__ import annotations

import struct
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
    DOWNLOAD = "download"  # a package a client downloads once before it joins (an algorithm's)
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


# Wire format: MAGIC | header length (8 bytes, little-endian) | UTF-8 JSON header | safetensors
# (its own 8-byte index length | JSON index | tensor bytes). encode pads the JSON header with spaces
# so the tensor bytes start 8-aligned, and decode can view them in place.
# Tensors of a global state under this prefix travel to the clients only (FIT, EVALUATE); a
# client's update never carries them (e.g. FLoRA's merged global delta).
DOWN_ONLY = "down/"
MAGIC = b"FTM1"
LENGTH = struct.Struct("<Q")
PREFIX_BYTES = len(MAGIC) + LENGTH.size
INDEX_PREFIX_BYTES = LENGTH.size
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 32  # JSON nesting of a header; fedtune's own messages use at most 5 levels
MAX_TENSORS = 1 << 16
MAX_INDEX_BYTES = 16 << 20
ALIGN = 8
MAX_NAME_CHARS = 128
HEADER_KEYS = frozenset({"kind", "round", "sender", "receiver", "meta"})
FLOAT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
ALLOWED_DTYPES = FLOAT_DTYPES | {torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype a tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a message's safetensors index: where its bytes lie after the index."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


@dataclass(frozen=True)
class Head:
    """What the first bytes of a message say: its checked header and tensor index, and its size."""

    header: dict[str, Any]
    tensors: dict[str, TensorEntry]
    data_start: int  # offset of the first tensor byte in the message
    size: int  # the exact size of the whole message this head describes
