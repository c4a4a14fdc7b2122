"""Tests for the message codec: exact round trips, and every malformed input refused."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from fedtune.errors import MessageError
from fedtune.transport.codec import (
    MAGIC,
    MAX_HEADER_BYTES,
    TensorSpec,
    check_message,
    decode,
    encode,
    specs_of,
)
from fedtune.wire import Message, MessageKind


def make_message(**changes) -> Message:
    fields = {
        "kind": MessageKind.UPDATE,
        "round": 3,
        "sender": "client-0",
        "receiver": "server",
        "tensors": {
            "lora_A": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
            "lora_B": torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).bfloat16(),
        },
        "meta": {"n_examples": 17, "metrics": {"loss": 0.125, "acc": 1.0}},
    }
    fields.update(changes)
    return Message(**fields)


def raw_message(header: object, blob: bytes | None = None) -> bytes:
    """Bytes with an arbitrary JSON header (to build malformed messages by hand)."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob = save_safetensors({}) if blob is None else blob
    return MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + blob


GOOD_HEADER = {"kind": "fit", "round": 0, "sender": "server", "receiver": "c1", "meta": {}}


def assert_same(a: Message, b: Message) -> None:
    assert (a.kind, a.round, a.sender, a.receiver) == (b.kind, b.round, b.sender, b.receiver)
    assert a.meta == b.meta
    assert json.dumps(a.meta) == json.dumps(b.meta)
    assert a.tensors.keys() == b.tensors.keys()
    for name, tensor in a.tensors.items():
        other = b.tensors[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape
        # bit-exact: compare the raw bytes, not values
        assert _raw_bytes(other) == _raw_bytes(tensor)


def _raw_bytes(tensor: torch.Tensor) -> list[int]:
    return tensor.contiguous().reshape(-1).view(torch.uint8).tolist()


# ---------------------------------------------------------------- round trips


def test_round_trip_many_dtypes_and_shapes():
    tensors = {
        "f32": torch.randn(5, 3),
        "bf16": torch.randn(2, 2, 2).bfloat16(),
        "f16": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
        "f64": torch.tensor([1e-300, 3.0], dtype=torch.float64),
        "i64": torch.tensor([-(2**62), 0, 2**62], dtype=torch.int64),
        "i32": torch.tensor([[1, -2]], dtype=torch.int32),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }
    meta = {
        "lr": 0.001,
        "nested": {"list": [1, 2.5, "x", None, True, {"k": []}]},
        "unicode": "zürich ✓",
        "big": 2**70,
    }
    msg = make_message(
        kind=MessageKind.FIT, sender="server", receiver="c1", tensors=tensors, meta=meta
    )
    assert_same(decode(encode(msg)), msg)


def test_round_trip_empty_tensors_and_meta():
    msg = Message(MessageKind.FINISH, 0, "server", "c1")
    back = decode(encode(msg))
    assert_same(back, msg)
    assert back.tensors == {} and back.meta == {}


@pytest.mark.parametrize("kind", list(MessageKind))
def test_every_kind_round_trips(kind):
    assert decode(encode(make_message(kind=kind))).kind is kind


def test_encode_handles_views_shared_storage_and_non_contiguous():
    base = torch.arange(20, dtype=torch.float32)
    tensors = {"a": base, "b": base, "t": base.reshape(4, 5).t(), "slice": base[3:7]}
    back = decode(encode(make_message(tensors=tensors)))
    for name, tensor in tensors.items():
        assert torch.equal(back.tensors[name], tensor)


def test_decode_accepts_bytearray_and_memoryview():
    data = encode(make_message())
    assert decode(bytearray(data)).sender == "client-0"
    assert decode(memoryview(data)).sender == "client-0"


# ---------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"x": float("nan")}, "meta['x']"),
        ({"metrics": {"loss": float("inf")}}, "meta['metrics']['loss']"),
        ({"t": torch.tensor(1.0)}, "meta['t'] is a Tensor"),
        ({"tuple": (1, 2)}, "meta['tuple'] is a tuple"),
        ({"obj": object()}, "meta['obj']"),
        ({"d": {1: "int key"}}, "keys must be str"),
        ({"l": [1, {2.0}]}, "meta['l'][1] is a set"),
    ],
)
def test_encode_refuses_non_json_meta(meta, reason):
    with pytest.raises(MessageError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        encode(make_message(meta=meta))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": "nope"}, "unknown message kind"),
        ({"round": -1}, "round must be >= 0"),
        ({"round": True}, "round must be an int"),
        ({"sender": ""}, "sender"),
        ({"receiver": "a\nb"}, "receiver"),
        ({"tensors": {"x": [1.0]}}, "tensor 'x' is a list"),
        ({"tensors": {"x": torch.tensor([1 + 2j])}}, "tensor 'x' has dtype"),
    ],
)
def test_encode_refuses_bad_fields(changes, reason):
    with pytest.raises(MessageError, match=reason):
        encode(make_message(**changes))


def test_encode_accepts_kind_as_string():
    assert decode(encode(make_message(kind="fit"))).kind is MessageKind.FIT


# ---------------------------------------------------------------- decode refusals


def test_truncated_at_every_cut_point_is_refused():
    data = encode(make_message())
    cuts = sorted(set(range(0, 40)) | set(range(0, len(data), 7)) | {len(data) - 1})
    for cut in cuts:
        with pytest.raises(MessageError):
            decode(data[:cut])


def test_trailing_garbage_is_refused():
    with pytest.raises(MessageError, match="safetensors"):
        decode(encode(make_message()) + b"\x00")


def test_bad_magic():
    data = encode(make_message())
    with pytest.raises(MessageError, match="bad magic"):
        decode(b"FTM2" + data[4:])


def test_header_length_beyond_buffer():
    data = bytearray(encode(make_message()))
    data[4:12] = struct.pack("<Q", len(data))
    with pytest.raises(MessageError, match="beyond the end"):
        decode(bytes(data))


def test_header_length_over_limit():
    data = MAGIC + struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(MessageError, match="over the limit"):
        decode(data)


def test_oversize_refused_before_parsing():
    data = encode(make_message())
    assert decode(data, max_bytes=len(data)).round == 3
    with pytest.raises(MessageError, match="over the limit"):
        decode(data, max_bytes=len(data) - 1)
    # the size check comes first: even garbage is reported as oversize
    with pytest.raises(MessageError, match="over the limit of 4"):
        decode(b"garbage", max_bytes=4)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"{not json", "header is not JSON"),
        (b"\xff\xfe{}", "header is not UTF-8"),
        (b'{"kind":"fit","round":NaN}', "header is not JSON"),
        (b'{"kind":"fit","kind":"fit"}', "header is not JSON"),
        (b"[" * 100_000, "header is not JSON"),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_header_not_json(header, reason):
    with pytest.raises(MessageError, match=reason):
        decode(raw_message(header))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": "launch_missiles"}, "unknown message kind"),
        ({"kind": 3}, "unknown message kind"),
        ({"round": True}, "round must be an int"),
        ({"round": -2}, "round must be >= 0"),
        ({"round": 1.0}, "round must be an int"),
        ({"round": "1"}, "round must be an int"),
        ({"sender": ""}, "sender"),
        ({"sender": 5}, "sender must be a str"),
        ({"sender": "x" * 129}, "sender"),
        ({"receiver": "tab\there"}, "receiver"),
        ({"meta": []}, "'meta' is not a JSON object"),
        ({"meta": None}, "'meta' is not a JSON object"),
    ],
)
def test_header_wrong_types(changes, reason):
    with pytest.raises(MessageError, match=reason):
        decode(raw_message({**GOOD_HEADER, **changes}))


def test_header_missing_and_extra_keys():
    missing = {k: v for k, v in GOOD_HEADER.items() if k != "meta"}
    with pytest.raises(MessageError, match=r"missing \['meta'\]"):
        decode(raw_message(missing))
    with pytest.raises(MessageError, match=r"unexpected \['code'\]"):
        decode(raw_message({**GOOD_HEADER, "code": "import os"}))


def test_good_hand_made_header_decodes():
    msg = decode(raw_message(GOOD_HEADER))
    assert msg.kind is MessageKind.FIT and msg.receiver == "c1" and msg.tensors == {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_non_finite_tensor_refused(bad, dtype):
    tensor = torch.tensor([1.0, bad, 2.0], dtype=dtype)
    data = encode(make_message(tensors={"ok": torch.ones(2), "x": tensor}))
    with pytest.raises(MessageError, match="tensor 'x' has non-finite values"):
        decode(data)


def test_disallowed_dtype_refused():
    # object tensors cannot exist in torch; the nearest risk is an unexpected dtype on the wire
    blob = save_safetensors({"x": torch.tensor([1, 2], dtype=torch.int16)})
    with pytest.raises(MessageError, match="tensor 'x' has dtype torch.int16"):
        decode(raw_message(GOOD_HEADER, blob))


def test_garbage_safetensors_part():
    with pytest.raises(MessageError, match="not valid safetensors"):
        decode(raw_message(GOOD_HEADER, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}......."))
    with pytest.raises(MessageError, match="not valid safetensors"):
        decode(raw_message(GOOD_HEADER, b""))


def test_not_bytes_refused():
    with pytest.raises(MessageError, match="not bytes"):
        decode("FTM1...")  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = encode(make_message())


def decode_or_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(data, max_bytes=1 << 20)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    decode_or_message_error(data)
    decode_or_message_error(MAGIC + data)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.integers(0, len(VALID)),
    st.binary(max_size=16),
)
def test_fuzz_mutated_valid_message(flips, cut, tail):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    decode_or_message_error(bytes(data))
    decode_or_message_error(bytes(data[:cut]) + tail)


# ---------------------------------------------------------------- check_message


def test_specs_of():
    specs = specs_of({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "s": torch.tensor(1)})
    assert specs == {
        "a": TensorSpec((2, 3), torch.bfloat16),
        "s": TensorSpec((), torch.int64),
    }


def test_check_message_accepts_matching():
    msg = make_message()
    check_message(
        msg,
        kinds={MessageKind.UPDATE},
        round=3,
        sender="client-0",
        tensor_specs=specs_of(msg.tensors),
    )


def test_check_message_kind():
    with pytest.raises(MessageError, match="kind 'update' but expected one of: eval_result, fit"):
        check_message(make_message(), kinds=[MessageKind.FIT, MessageKind.EVAL_RESULT])


def test_check_message_round():
    with pytest.raises(MessageError, match="round 3 but expected 4"):
        check_message(make_message(), kinds=[MessageKind.UPDATE], round=4)


def test_check_message_sender():
    with pytest.raises(MessageError, match="sender 'client-0' but expected 'client-1'"):
        check_message(make_message(), kinds=[MessageKind.UPDATE], sender="client-1")


def test_check_message_names():
    msg = make_message()
    specs = specs_of(msg.tensors)
    del specs["lora_B"]
    specs["lora_C"] = TensorSpec((1,), torch.float32)
    with pytest.raises(MessageError, match=r"missing 1: \['lora_C'\]; unexpected 1: \['lora_B'\]"):
        check_message(msg, kinds=[MessageKind.UPDATE], tensor_specs=specs)


def test_check_message_lists_only_first_names():
    specs = {f"w{i:02d}": TensorSpec((1,), torch.float32) for i in range(20)}
    with pytest.raises(MessageError, match=r"missing 20: \['w00', 'w01', 'w02', 'w03', 'w04'\]"):
        check_message(make_message(tensors={}), kinds=[MessageKind.UPDATE], tensor_specs=specs)


def test_check_message_shape_and_dtype():
    msg = make_message()
    specs = specs_of(msg.tensors)
    wrong_shape = {**specs, "lora_A": TensorSpec((4, 3), torch.float32)}
    with pytest.raises(
        MessageError, match=r"tensor 'lora_A' has shape \(3, 4\) but expected \(4, 3\)"
    ):
        check_message(msg, kinds=[MessageKind.UPDATE], tensor_specs=wrong_shape)
    wrong_dtype = {**specs, "lora_B": TensorSpec((4, 2), torch.float32)}
    with pytest.raises(MessageError, match="tensor 'lora_B' has dtype torch.bfloat16 but expected"):
        check_message(msg, kinds=[MessageKind.UPDATE], tensor_specs=wrong_dtype)


def test_header_size_reads_the_prefix_byte_by_byte_and_checks_it_as_soon_as_it_can():
    from fedtune.transport.codec import header_size

    # MAGIC "FTM1", then the header length as 8 little-endian bytes: 12 prefix bytes
    data = encode(Message(MessageKind.EVALUATE, 1, "server", "c0"))
    header_len = int.from_bytes(data[4:12], "little")
    assert data[:4] == b"FTM1" and header_len > 0
    for n in range(12):   # the prefix incomplete: not known yet (and a right start is no error)
        assert header_size(data[:n]) is None
    assert header_size(data[:12]) == 12 + header_len
    assert header_size(bytearray(data)) == 12 + header_len
    for bad in (b"X", b"FTX", b"FTM2" + bytes(8)):
        with pytest.raises(MessageError, match=r"^bad magic \(not an encoded message\)$"):
            header_size(bad)
    limit = 1 << 20
    assert header_size(b"FTM1" + struct.pack("<Q", limit)) == 12 + limit
    with pytest.raises(MessageError, match=rf"^header length {limit + 1} is over the limit of {limit}$"):
        header_size(b"FTM1" + struct.pack("<Q", limit + 1))
