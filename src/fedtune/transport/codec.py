"""Message <-> bytes: a small JSON header plus one safetensors blob; every check on decode.

This module is the one owner of the byte layout: framing and the gRPC server read a message's
head (its JSON header and tensor index) through `head_size` / `read_head` before its tensor bytes
arrive, and `decode` builds tensors as views of the received buffer (no second copy).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from fedtune.errors import MessageError
from fedtune.wire import (
    ALIGN,
    ALLOWED_DTYPES,
    FLOAT_DTYPES,
    HEADER_KEYS,
    INDEX_PREFIX_BYTES,
    LENGTH,
    MAGIC,
    MAX_DEPTH,
    MAX_HEADER_BYTES,
    MAX_INDEX_BYTES,
    MAX_NAME_CHARS,
    MAX_TENSORS,
    PREFIX_BYTES,
    Head,
    Message,
    MessageKind,
    TensorEntry,
    TensorSpec,
)

Buffer = bytes | bytearray | memoryview

# Wire format (fedtune.wire holds the constants): MAGIC | header length (8 bytes, little-endian) |
# UTF-8 JSON header | safetensors (its own 8-byte index length | JSON index | tensor bytes). encode
# pads the JSON header with spaces so the tensor bytes start 8-aligned, and decode views them in place.
_LENGTH = LENGTH
_SHOWN_NAMES = 5


_WIRE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}
_OTHER_DTYPES = {"I16": "torch.int16", "U16": "torch.uint16", "U32": "torch.uint32",
                 "U64": "torch.uint64", "F8_E4M3": "torch.float8_e4m3fn", "F8_E5M2": "torch.float8_e5m2"}


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec of every tensor, by name (to check replies against what was sent)."""
    return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()}


# ---------------------------------------------------------------- encode


def encode(message: Message) -> bytes:
    """Serialise a message; raises MessageError for anything decode would refuse to read."""
    return b"".join((encode_header(message), encode_tensors(message.tensors)))


def encode_header(message: Message) -> bytes:
    """The message's bytes before its tensor part: magic, length and the (padded) JSON header."""
    kind = _check_kind(message.kind)
    _check_round(message.round)
    _check_name("sender", message.sender)
    _check_name("receiver", message.receiver)
    if not isinstance(message.meta, dict):
        raise MessageError(f"meta must be a dict, got {type(message.meta).__name__}")
    _check_json_value(message.meta, "meta", 1)
    header = {
        "kind": kind.value,
        "round": message.round,
        "sender": message.sender,
        "receiver": message.receiver,
        "meta": message.meta,
    }
    header_bytes = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-(PREFIX_BYTES + len(header_bytes)) % ALIGN)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise MessageError(f"header is {len(header_bytes)} bytes, over {MAX_HEADER_BYTES}")
    return b"".join((MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes))


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The message's tensor part (safetensors bytes)."""
    wire = _wire_tensors(tensors)
    if len(wire) > MAX_TENSORS:
        raise MessageError(f"{len(wire)} tensors, over the limit of {MAX_TENSORS}")
    return save_safetensors(wire)


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


def _check_json_value(value: Any, path: str, depth: int) -> None:
    """Accept exactly the JSON types (str keys, finite floats, no tuples) so round trips are exact."""
    if depth > MAX_DEPTH:
        raise MessageError(f"{path} is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MessageError(f"{path} is {value}; only finite floats may travel")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MessageError(f"{path} has key {key!r}; keys must be str")
            _check_json_value(item, f"{path}[{key!r}]", depth + 1)
        return
    raise MessageError(
        f"{path} is a {type(value).__name__}; meta may hold only str, int, float, bool, "
        "None, lists and dicts"
    )


# ---------------------------------------------------------------- the head: header and index


def header_size(data: Buffer) -> int | None:
    """How many leading bytes `read_header` needs, or None while the prefix is incomplete; checks
    the magic and the header length limit as soon as they are there."""
    view = memoryview(data).cast("B")
    if bytes(view[: len(MAGIC)]) != MAGIC[: min(len(view), len(MAGIC))]:
        raise MessageError("bad magic (not an encoded message)")
    if len(view) < PREFIX_BYTES:
        return None
    (header_len,) = _LENGTH.unpack_from(view, len(MAGIC))
    if header_len > MAX_HEADER_BYTES:
        raise MessageError(f"header length {header_len} is over the limit of {MAX_HEADER_BYTES}")
    return PREFIX_BYTES + header_len


def head_size(data: Buffer, *, max_index_bytes: int = MAX_INDEX_BYTES) -> int | None:
    """How many leading bytes `read_head` needs, or None while fewer than that can be known.

    Checks the magic and both length fields as soon as they are there, so a stream can be refused
    after its first bytes.
    """
    view = memoryview(data).cast("B")
    if len(view) < PREFIX_BYTES:
        if bytes(view[: len(MAGIC)]) != MAGIC[: len(view)]:
            raise MessageError("bad magic (not an encoded message)")
        return None
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise MessageError("bad magic (not an encoded message)")
    (header_len,) = _LENGTH.unpack_from(view, len(MAGIC))
    if header_len > MAX_HEADER_BYTES:
        raise MessageError(f"header length {header_len} is over the limit of {MAX_HEADER_BYTES}")
    index_at = PREFIX_BYTES + header_len
    if len(view) < index_at + INDEX_PREFIX_BYTES:
        return None
    (index_len,) = _LENGTH.unpack_from(view, index_at)
    if index_len > max_index_bytes:
        raise MessageError(f"tensor index of {index_len} bytes is over the limit of {max_index_bytes}")
    return index_at + INDEX_PREFIX_BYTES + index_len


def read_header(data: Buffer) -> dict[str, Any]:
    """The checked JSON header of an encoded message (kind, round, sender, receiver, meta)."""
    view = memoryview(data).cast("B")
    head_size(view[:PREFIX_BYTES])  # magic and header length
    if len(view) < PREFIX_BYTES:
        raise MessageError(f"message is truncated ({len(view)} bytes)")
    (header_len,) = _LENGTH.unpack_from(view, len(MAGIC))
    end = PREFIX_BYTES + header_len
    if end > len(view):
        raise MessageError(f"header length {header_len} is beyond the end of the message")
    return _parse_header(bytes(view[PREFIX_BYTES:end]))


def read_head(data: Buffer, *, max_tensors: int = MAX_TENSORS,
              max_index_bytes: int = MAX_INDEX_BYTES, header: dict[str, Any] | None = None) -> Head:
    """Parse and check the header and tensor index at the start of `data` (tensor bytes unread);
    `header`: what `read_header` already returned for these bytes."""
    view = memoryview(data).cast("B")
    header = read_header(view) if header is None else header
    needed = head_size(view, max_index_bytes=max_index_bytes)
    if needed is None or needed > len(view):
        raise MessageError("tensor part is not valid safetensors (truncated index)")
    index_at = PREFIX_BYTES + _LENGTH.unpack_from(view, len(MAGIC))[0] + INDEX_PREFIX_BYTES
    tensors = _parse_index(bytes(view[index_at:needed]), max_tensors)
    data_bytes = max((e.end for e in tensors.values()), default=0)
    return Head(header, tensors, needed, needed + data_bytes)


def _parse_index(raw: bytes, max_tensors: int) -> dict[str, TensorEntry]:
    """The safetensors index: names, dtypes, shapes and byte ranges that tile the data exactly."""
    try:
        index = _parse_json(raw, "index")
    except MessageError as error:
        raise MessageError(f"tensor part is not valid safetensors ({error})") from None
    if not isinstance(index, dict):
        raise MessageError("tensor part is not valid safetensors (index is not a JSON object)")
    if len(index) > max_tensors:
        raise MessageError(f"{len(index)} tensors, over the limit of {max_tensors}")
    entries: dict[str, TensorEntry] = {}
    for name, info in index.items():
        shown = name[:40]
        if not name or name == "__metadata__":
            raise MessageError(f"tensor name {shown!r} is not allowed")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise MessageError(f"tensor '{shown}' has a malformed index entry")
        dtype = _WIRE_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            named = _OTHER_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
            raise MessageError(f"tensor '{shown}' has dtype {named or repr(str(info['dtype'])[:20])}, "
                               "not allowed")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 16 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape):
            raise MessageError(f"tensor '{shown}' has an invalid shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 1 << 62 for o in offsets):
            raise MessageError(f"tensor '{shown}' has invalid data offsets")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise MessageError(f"tensor '{shown}' has {offsets[1] - offsets[0]} bytes for "
                               f"{nbytes} of its shape and dtype")
        entries[name] = TensorEntry(tuple(shape), dtype, offsets[0], offsets[1])
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise MessageError("tensor byte ranges overlap or leave gaps")
        position = entry.end
    return entries


# ---------------------------------------------------------------- decode


def decode(data: Buffer, *, max_bytes: int | None = None) -> Message:
    """Parse and check bytes from a peer; any problem raises MessageError with a short reason.

    Tensors are views of one writable buffer: `data` itself when it is a bytearray (as the
    transports' reassembly makes), otherwise one copy of it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"message is a {type(data).__name__}, not bytes")
    size = memoryview(data).nbytes
    if max_bytes is not None and size > max_bytes:
        raise MessageError(f"message is {size} bytes, over the limit of {max_bytes}")
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    head = read_head(buffer)
    if head.size != len(buffer):
        raise MessageError(f"tensor part (safetensors) is {len(buffer) - head.data_start} bytes after "
                           f"its index, but the index describes {head.size - head.data_start}")
    header = head.header
    return Message(
        kind=MessageKind(header["kind"]),
        round=header["round"],
        sender=header["sender"],
        receiver=header["receiver"],
        tensors=tensors_of(buffer, head),
        meta=header["meta"],
    )


def tensors_of(buffer: bytearray, head: Head) -> dict[str, torch.Tensor]:
    """The tensors `head` describes, as views of `buffer` (copied only when misaligned); values
    checked: floats finite, bools 0 or 1. Each view has its own storage object over its own bytes,
    so they do not count as shared memory (safetensors would refuse to save them together)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in head.tensors.items():
        at, nbytes = head.data_start + entry.start, entry.end - entry.start
        if nbytes == 0:
            tensors[name] = torch.empty(entry.shape, dtype=entry.dtype)
            continue
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=at)
        if at % torch.empty((), dtype=entry.dtype).element_size():
            raw = raw.clone()
        if entry.dtype == torch.bool and int(raw.max()) > 1:
            raise MessageError(f"tensor '{name}' has bool bytes other than 0 and 1")
        tensor = raw.view(entry.dtype).reshape(entry.shape)
        if entry.dtype in FLOAT_DTYPES and not all_finite(tensor):
            raise MessageError(f"tensor '{name}' has non-finite values")
        tensors[name] = tensor
    return tensors


_FINITE_CHUNK = 1 << 20  # elements checked at a time: isfinite's temporaries are ~2x their input


def all_finite(tensor: torch.Tensor) -> bool:
    """Every value finite, checked in chunks so the check costs megabytes, not the tensor's size."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(_FINITE_CHUNK))


def _parse_header(raw: bytes) -> dict[str, Any]:
    header = _parse_json(raw, "header")
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


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(raw: bytes) -> int:
    """The deepest nesting of JSON arrays and objects in `raw` (brackets inside strings ignored)."""
    skeleton = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _parse_json(raw: bytes, what: str) -> Any:
    """JSON with no NaN/Infinity, no duplicate keys, and nesting bounded before parsing."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MessageError(f"{what} is not UTF-8") from error
    if nesting_depth(raw) > MAX_DEPTH:
        raise MessageError(f"{what} is not JSON (nested deeper than {MAX_DEPTH} levels)")
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:
        raise MessageError(f"{what} is not JSON ({_short(error)})") from error


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


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
        check_tensor_specs(msg.tensors, tensor_specs)


def _kind_text(kind: Any) -> str:
    return kind.value if isinstance(kind, MessageKind) else str(kind)


def check_tensor_specs(tensors: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> None:
    """Raise MessageError unless `tensors` (tensors or index entries) match `specs` exactly."""
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
