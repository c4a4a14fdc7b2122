"""Message <-> bytes: a small JSON header plus one safetensors blob; every check on decode."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtune.errors import MessageError
from fedtune.runtime.messages import Message, MessageKind

# Wire format: MAGIC | header length (8 bytes, little-endian) | UTF-8 JSON header | safetensors.
MAGIC = b"FTM1"
_LENGTH = struct.Struct("<Q")
PREFIX_BYTES = len(MAGIC) + _LENGTH.size
MAX_HEADER_BYTES = 1 << 20
MAX_NAME_CHARS = 128
HEADER_KEYS = frozenset({"kind", "round", "sender", "receiver", "meta"})
FLOAT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
ALLOWED_DTYPES = FLOAT_DTYPES | {torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool}
_SHOWN_NAMES = 5


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype a tensor must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec of every tensor, by name (to check replies against what was sent)."""
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}


# ---------------------------------------------------------------- encode


def encode(message: Message) -> bytes:
    """Serialise a message; raises MessageError for anything decode would refuse to read."""
    kind = _check_kind(message.kind)
    _check_round(message.round)
    _check_name("sender", message.sender)
    _check_name("receiver", message.receiver)
    if not isinstance(message.meta, dict):
        raise MessageError(f"meta must be a dict, got {type(message.meta).__name__}")
    _check_json_value(message.meta, "meta")
    header = {
        "kind": kind.value,
        "round": message.round,
        "sender": message.sender,
        "receiver": message.receiver,
        "meta": message.meta,
    }
    header_bytes = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(header_bytes)} bytes, over {MAX_HEADER_BYTES}")
    blob = save_safetensors(_wire_tensors(message.tensors))
    return b"".join((MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes, blob))


def _wire_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; ones sharing storage are copied (safetensors refuses)."""
    if not isinstance(tensors, Mapping):
        raise MessageError(f"tensors must be a dict, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise MessageError(f"tensor name {name!r} is not a non-empty str")
        if not isinstance(tensor, torch.Tensor):
            raise MessageError(f"tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in ALLOWED_DTYPES:
            raise MessageError(f"tensor '{name}' has dtype {tensor.dtype}, not allowed on the wire")
        wire = tensor.detach().to("cpu").contiguous()
        if wire.numel() > 0:
            pointer = wire.untyped_storage().data_ptr()
            if pointer in seen_storage:
                wire = wire.clone()
            seen_storage.add(pointer)
        out[name] = wire
    return out


def _check_json_value(value: Any, path: str) -> None:
    """Accept exactly the JSON types (str keys, finite floats, no tuples) so round trips are exact."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MessageError(f"{path} is {value}; only finite floats may travel")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MessageError(f"{path} has key {key!r}; keys must be str")
            _check_json_value(item, f"{path}[{key!r}]")
        return
    raise MessageError(
        f"{path} is a {type(value).__name__}; meta may hold only str, int, float, bool, "
        "None, lists and dicts"
    )


# ---------------------------------------------------------------- decode


def decode(data: bytes, *, max_bytes: int | None = None) -> Message:
    """Parse and check bytes from a peer; any problem raises MessageError with a short reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"message is a {type(data).__name__}, not bytes")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise MessageError(f"message is {len(data)} bytes, over the limit of {max_bytes}")
    if len(data) < PREFIX_BYTES:
        raise MessageError(f"message is truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise MessageError("bad magic")
    (header_len,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_len > MAX_HEADER_BYTES:
        raise MessageError(f"header length {header_len} is over the limit of {MAX_HEADER_BYTES}")
    header_end = PREFIX_BYTES + header_len
    if header_end > len(data):
        raise MessageError(f"header length {header_len} is beyond the end of the message")
    header = _parse_header(data[PREFIX_BYTES:header_end])
    tensors = _parse_tensors(data[header_end:])
    return Message(
        kind=MessageKind(header["kind"]),
        round=header["round"],
        sender=header["sender"],
        receiver=header["receiver"],
        tensors=tensors,
        meta=header["meta"],
    )


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(
            raw.decode("utf-8"),
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except UnicodeDecodeError as error:
        raise MessageError("header is not UTF-8") from error
    except (ValueError, RecursionError) as error:
        raise MessageError(f"header is not JSON ({_short(error)})") from error
    if not isinstance(header, dict):
        raise MessageError("header is not a JSON object")
    keys = set(header)
    if keys != HEADER_KEYS:
        missing = sorted(HEADER_KEYS - keys)
        extra = sorted(keys - HEADER_KEYS)
        raise MessageError(
            f"header keys wrong: missing {missing}, unexpected {extra[:_SHOWN_NAMES]}"
        )
    _check_kind(header["kind"])
    _check_round(header["round"])
    _check_name("sender", header["sender"])
    _check_name("receiver", header["receiver"])
    if not isinstance(header["meta"], dict):
        raise MessageError("header 'meta' is not a JSON object")
    return header


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(blob)
    except Exception as error:  # safetensors raises its own error types, and others on odd input
        raise MessageError(f"tensor part is not valid safetensors ({_short(error)})") from error
    for name, tensor in tensors.items():
        if tensor.dtype not in ALLOWED_DTYPES:
            raise MessageError(f"tensor '{name}' has dtype {tensor.dtype}, not allowed")
        if tensor.dtype in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
            raise MessageError(f"tensor '{name}' has non-finite values")
    return tensors


def _short(error: BaseException, limit: int = 120) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:limit]


# ---------------------------------------------------------------- shared field checks


def _check_kind(kind: Any) -> MessageKind:
    if isinstance(kind, MessageKind):
        return kind
    if isinstance(kind, str):
        try:
            return MessageKind(kind)
        except ValueError:
            pass
    raise MessageError(f"unknown message kind {str(kind)[:40]!r}")


def _check_round(round_: Any) -> None:
    if isinstance(round_, bool) or not isinstance(round_, int):
        raise MessageError(f"round must be an int, got {type(round_).__name__}")
    if round_ < 0:
        raise MessageError(f"round must be >= 0, got {round_}")


def _check_name(field_name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise MessageError(f"{field_name} must be a str, got {type(value).__name__}")
    if not value or len(value) > MAX_NAME_CHARS or not value.isprintable():
        raise MessageError(
            f"{field_name} {value[:40]!r} must be 1 to {MAX_NAME_CHARS} printable characters"
        )


# ---------------------------------------------------------------- checks against expectations


def check_message(
    msg: Message,
    *,
    kinds: Collection[MessageKind],
    round: int | None = None,
    sender: str | None = None,
    tensor_specs: Mapping[str, TensorSpec] | None = None,
) -> None:
    """Raise MessageError unless the message is of an expected kind, round, sender and tensors."""
    if msg.kind not in kinds:
        allowed = ", ".join(sorted(MessageKind(k).value for k in kinds))
        raise MessageError(f"kind '{_kind_text(msg.kind)}' but expected one of: {allowed}")
    if round is not None and msg.round != round:
        raise MessageError(f"round {msg.round} but expected {round}")
    if sender is not None and msg.sender != sender:
        raise MessageError(f"sender '{msg.sender}' but expected '{sender}'")
    if tensor_specs is not None:
        _check_tensors(msg.tensors, tensor_specs)


def _kind_text(kind: Any) -> str:
    return kind.value if isinstance(kind, MessageKind) else str(kind)


def _check_tensors(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> None:
    missing = sorted(set(specs) - set(tensors))
    unexpected = sorted(set(tensors) - set(specs))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:_SHOWN_NAMES]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:_SHOWN_NAMES]}")
        raise MessageError("tensor names differ; " + "; ".join(parts))
    for name, spec in specs.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(spec.shape):
            raise MessageError(
                f"tensor '{name}' has shape {tuple(tensor.shape)} but expected {tuple(spec.shape)}"
            )
        if tensor.dtype != spec.dtype:
            raise MessageError(
                f"tensor '{name}' has dtype {tensor.dtype} but expected {spec.dtype}"
            )
