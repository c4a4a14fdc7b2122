"""Chunk frames: round trips of any size, early refusal of over-limit streams, shared encoding."""

from __future__ import annotations

import pytest
import torch

from fedtune.transport.codec import decode, encode
from fedtune.transport.framing import (
    FRAME,
    FRAME_MAGIC,
    LAST,
    FrameError,
    Reassembler,
    SharedEncoder,
    is_last,
    iter_frames,
    peek_header,
    ping_frame,
)
from fedtune.wire import Message, MessageKind

CHUNK = 64


def _reassemble(frames, max_bytes=10_000, max_chunk=CHUNK):
    r = Reassembler(max_bytes, max_chunk)
    out = [m for m in (r.add(f) for f in frames) if m is not None]
    r.finish()
    return out


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK + 3])
def test_frames_round_trip_any_size(size):
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    frames = list(iter_frames([payload], 7, CHUNK))
    assert len(frames) == max(1, -(-size // CHUNK))
    assert [is_last(f) for f in frames] == [False] * (len(frames) - 1) + [True]
    assert all(len(f) <= FRAME.size + CHUNK for f in frames)
    assert _reassemble(frames) == [payload]


def test_frames_span_several_parts_and_messages_follow_each_other():
    parts = [b"a" * 50, memoryview(b"b" * 100), b"", b"c" * 7]
    first = list(iter_frames(parts, 1, CHUNK))
    second = list(iter_frames([b"xyz"], 2, CHUNK))
    assert _reassemble([*first, ping_frame(), *second]) == [b"a" * 50 + b"b" * 100 + b"c" * 7, b"xyz"]


def test_over_limit_stream_is_refused_at_its_first_frame():
    frames = iter_frames([b"x" * 1000], 1, CHUNK)
    r = Reassembler(max_bytes=999, max_chunk=CHUNK)
    with pytest.raises(FrameError, match="over the limit") as info:
        r.add(next(frames))
    assert info.value.too_large


def test_stream_longer_than_declared_is_refused():
    header = FRAME.pack(FRAME_MAGIC, 1, 0, 0, 10)
    r = Reassembler(max_bytes=1000, max_chunk=CHUNK)
    with pytest.raises(FrameError, match="longer than") as info:
        r.add(header + b"x" * 11)
    assert info.value.too_large


def test_oversized_chunk_is_refused():
    frame = FRAME.pack(FRAME_MAGIC, 1, 0, LAST, CHUNK + 1) + b"x" * (CHUNK + 1)
    with pytest.raises(FrameError, match="chunk of") as info:
        Reassembler(10_000, CHUNK).add(frame)
    assert info.value.too_large


@pytest.mark.parametrize("frame, reason", [
    (b"\x00" * 5, "shorter than its header"),
    (b"XXXX" + b"\x00" * 21, "bad frame magic"),
    (FRAME.pack(FRAME_MAGIC, 1, 3, 0, 10) + b"x", "starts with chunk 3"),
    (FRAME.pack(FRAME_MAGIC, 1, 0, 64, 10) + b"x", "unknown frame flags"),
    (FRAME.pack(FRAME_MAGIC, 1, 0, LAST, 10) + b"x", "last frame after 1 of 10"),
    (FRAME.pack(FRAME_MAGIC, 1, 0, 0, 10), "empty chunk"),
])
def test_malformed_frames_are_refused(frame, reason):
    with pytest.raises(FrameError, match=reason):
        Reassembler(1000, CHUNK).add(frame)


def test_out_of_sequence_ping_inside_and_truncated_streams_are_refused():
    frames = list(iter_frames([b"y" * 200], 5, CHUNK))
    r = Reassembler(1000, CHUNK)
    r.add(frames[0])
    with pytest.raises(FrameError, match="out of sequence"):
        r.add(frames[2])
    r = Reassembler(1000, CHUNK)
    r.add(frames[0])
    with pytest.raises(FrameError, match="ping frame inside"):
        r.add(ping_frame())
    r = Reassembler(1000, CHUNK)
    r.add(frames[0])
    with pytest.raises(FrameError, match="stream ended after 64 of 200"):
        r.finish()


def _message(tensors, receiver="client_0", meta=None):
    return Message(MessageKind.FIT, 3, "server", receiver, tensors=tensors, meta=meta or {"lr": 0.5})


def test_shared_encoder_gives_exactly_the_codec_bytes_and_shares_the_tensor_part():
    tensors = {"a": torch.randn(7, 3), "b": torch.arange(5), "c": torch.ones(2, dtype=torch.bfloat16)}
    encoder = SharedEncoder()
    head0, body0 = encoder.encode(_message(tensors, "client_0"))
    head1, body1 = encoder.encode(_message(tensors, "client_1", {"lr": 0.25, "x": [1, "y"]}))
    assert head0 + bytes(body0) == encode(_message(tensors, "client_0"))
    assert head1 + bytes(body1) == encode(_message(tensors, "client_1", {"lr": 0.25, "x": [1, "y"]}))
    assert body0 is body1  # one copy of the adapter for every client of a round
    other = {"a": torch.zeros(7, 3)}
    head2, body2 = encoder.encode(_message(other))
    assert body2 is not body0 and head2 + bytes(body2) == encode(_message(other))
    finish = Message(MessageKind.FINISH, 3, "server", "client_0")
    head, body = encoder.encode(finish)
    assert head + bytes(body) == encode(finish)
    decoded = decode(b"".join(f[FRAME.size:] for f in iter_frames([head1, body1], 1, 16)))
    assert torch.equal(decoded.tensors["a"], tensors["a"]) and decoded.meta["x"] == [1, "y"]


def test_peek_header_reads_the_header_only():
    data = encode(_message({"a": torch.ones(3)}))
    header = peek_header(data)
    assert header["kind"] == "fit" and header["round"] == 3 and header["meta"] == {"lr": 0.5}
    with pytest.raises(Exception, match="not an encoded message"):
        peek_header(b"garbage")
