"""The codec as the one owner of the byte layout: heads read early, decode in place, bounded JSON."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedtune.errors import MessageError
from fedtune.transport.codec import (
    MAX_DEPTH,
    PREFIX_BYTES,
    decode,
    encode,
    head_size,
    nesting_depth,
    read_head,
)
from fedtune.transport.framing import peek_header
from fedtune.wire import Message, MessageKind


def _message(**tensors):
    return Message(MessageKind.UPDATE, 2, "client_0", "server", tensors=tensors,
                   meta={"n_examples": 4})


def _with_index(index: dict, data: bytes) -> bytearray:
    """An encoded message whose safetensors index is `index` (hand-made), then `data`."""
    head = encode(_message())[: -len(b'\x08\x00\x00\x00\x00\x00\x00\x00{}      ')]
    raw = json.dumps(index).encode()
    return bytearray(head + struct.pack("<Q", len(raw)) + raw + data)


def test_decode_views_the_received_buffer_and_tensor_bytes_are_8_aligned():
    buffer = bytearray(encode(_message(a=torch.arange(5, dtype=torch.float32), b=torch.ones(2, 3),
                                       c=torch.tensor([1, 2], dtype=torch.int64))))
    msg = decode(buffer)
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for name, tensor in msg.tensors.items():
        assert start <= tensor.data_ptr() < start + len(buffer), name  # a view, not a copy
        assert (tensor.data_ptr() - start) % tensor.element_size() == 0, name  # aligned
    assert msg.tensors["a"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert msg.tensors["c"].tolist() == [1, 2] and msg.tensors["b"].shape == (2, 3)
    head = read_head(buffer)
    at = head.data_start + head.tensors["c"].start
    assert at % 8 == 0  # encode pads the header so tensor bytes start 8-aligned
    buffer[at:at + 16] = bytes(16)  # the views really are the buffer: c's 16 bytes become zeros
    assert msg.tensors["c"].tolist() == [0, 0]


def test_head_size_and_read_head_before_the_tensor_bytes_arrive():
    data = encode(_message(w=torch.zeros(1000)))
    assert head_size(data[:5]) is None and head_size(data[:PREFIX_BYTES]) is None
    needed = head_size(data)
    assert needed == len(data) - 4000  # everything before the 1000 floats
    head = read_head(data[:needed])  # only the head: enough to know names, shapes and size
    assert list(head.tensors) == ["w"] and head.tensors["w"].shape == (1000,)
    assert head.size == len(data) and head.header["meta"] == {"n_examples": 4}
    with pytest.raises(MessageError, match="bad magic"):
        head_size(b"FTX")
    with pytest.raises(MessageError, match="2 tensors, over the limit of 1"):
        read_head(encode(_message(a=torch.zeros(1), b=torch.zeros(1))), max_tensors=1)


@pytest.mark.parametrize(("index", "data", "reason"), [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(12), "overlap or leave gaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "overlap or leave gaps"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "8 bytes for 12"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "invalid shape"),
    ({"__metadata__": {"x": "y"}}, b"", "not allowed"),
    ({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02", "bool bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "index describes 4"),
])
def test_malformed_tensor_indexes_are_refused(index, data, reason):
    with pytest.raises(MessageError, match=reason):
        decode(_with_index(index, data))


def test_deeply_nested_json_is_refused_without_recursion():
    deep = b'{"kind":"fit","round":1,"sender":"server","receiver":"c","meta":{"x":' + \
        b"[" * 50_000 + b"]" * 50_000 + b"}}"
    data = b"FTM1" + struct.pack("<Q", len(deep)) + deep + b"\x08" + bytes(7) + b"{}      "
    for parse in (peek_header, decode):  # the deployed client reads the header with peek_header
        with pytest.raises(MessageError, match=f"nested deeper than {MAX_DEPTH}"):
            parse(data)
    assert nesting_depth(b'{"a":"[[[[","b":[[1]]}') == 3  # brackets in strings do not count
    with pytest.raises(MessageError, match="nested deeper"):
        encode(Message(MessageKind.FIT, 1, "server", "c", meta={"x": [[[[[[[[[[[[[[[[[[[[[[[[
            [[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}))


def test_decoded_views_do_not_count_as_shared_memory(tmp_path):
    from safetensors.torch import load_file, save_file

    msg = decode(encode(_message(a=torch.ones(4), b=torch.zeros(2, 2), e=torch.zeros(0))))
    save_file(msg.tensors, str(tmp_path / "x.safetensors"))  # refuses tensors sharing storage
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded["a"].tolist() == [1.0] * 4 and loaded["e"].shape == (0,)
    assert decode(encode(msg)).tensors["b"].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_a_non_finite_value_past_the_first_chunk_is_found():
    values = torch.zeros((1 << 20) + 10)
    values[(1 << 20) + 7] = float("inf")
    with pytest.raises(MessageError, match="tensor 'v' has non-finite values"):
        decode(encode(_message(v=values)))
