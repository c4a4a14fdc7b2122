"""Hostile parties against the real gRPC transport (TLS, real tokens, loopback): uploads bigger than
expected, many-tensor and late uploads, a wrong-token flood; all bounded, nothing stops the round."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import torch
from test_grpc_transport import (  # the helpers of the transport's own tests
    CLIENTS,
    _connect,
    _echo,
    _finish,
    _round,
    _section,
    _serving,
    certs,  # noqa: F401 - a fixture
)

from fedtune.transport.codec import TensorSpec, encode
from fedtune.transport.expect import HEADER_ALLOWANCE
from fedtune.transport.framing import FRAME, FRAME_MAGIC, iter_frames
from fedtune.transport.grpc_server import FETCH
from fedtune.wire import Message, MessageKind

SPECS = {"w": TensorSpec((3,), torch.float32)}


def _counted(frames, consumed):
    for frame in frames:
        consumed.append(len(frame))
        yield frame


def _push(conn, frames):
    return conn._push(frames, metadata=conn.metadata, timeout=10)


def test_uploads_are_refused_by_what_the_server_expects_before_their_bytes(certs, caplog):  # noqa: F811
    section = _section(certs, max_message_bytes=64 * 1024**2)
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    with _serving(section) as (server, address, conns):
        conns += [_connect(section, address, c) for c in CLIENTS]
        hostile = conns[0]
        pulled = []
        reader = threading.Thread(target=lambda: pulled.extend(hostile.messages()), daemon=True)
        reader.start()
        honest = _echo(conns[1])
        assert server.wait_for_clients(10) == CLIENTS
        server.expect(1, MessageKind.UPDATE, CLIENTS, SPECS)
        for c in CLIENTS:
            server.send(Message(MessageKind.FIT, 1, "server", c, tensors={"w": torch.ones(3)}))
        # 3 float32, the bound of their one-entry index (2 + 6 per name byte + 96 + 21 per dim),
        # and the header allowance: about 1 MiB, far under max_message_bytes
        limit = 12 + (2 + 6 + 96 + 21) + HEADER_ALLOWANCE
        deadline = time.monotonic() + 10
        while not pulled and time.monotonic() < deadline:
            time.sleep(0.02)

        # 1. declares 50 MB (under max_message_bytes, over what an update of 3 floats can be)
        consumed: list[int] = []
        big = (FRAME.pack(FRAME_MAGIC, 9, i, 0, 50 * 1024**2) + b"x" * 1000 for i in range(60_000))
        try:
            _push(hostile, _counted(big, consumed))
            raise AssertionError("an over-size upload was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.details().startswith("too large: a message of 52428800 bytes is over the "
                                            f"limit of {limit} bytes expected from 'client_0'")
        assert len(consumed) < 200  # refused at the first frame, not after 50 MB

        # 2. within the size, but 3,000 tensors of other names and a 600 kB tail: refused at its
        # index, before the tail's bytes are read
        tensors = {f"t{i}": torch.zeros(1) for i in range(3000)}
        tensors["zz_tail"] = torch.zeros(150_000)
        many = encode(Message(MessageKind.UPDATE, 1, "client_0", "server", tensors=tensors,
                              meta={"n_examples": 1}))
        assert len(many) < limit
        consumed = []
        try:
            _push(hostile, _counted(iter_frames([many], 10, 1024), consumed))
            raise AssertionError("a many-tensor upload was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert exc.details().startswith("tensor index of ")  # refused at its length field
            assert exc.details().endswith("bytes is over the limit of 133")  # the bound for 'w' + 8
        assert sum(consumed) < len(many) // 2

        # 2b. one tensor of the right size under another name, followed by 600 kB more: refused at
        # the index (names), before the rest
        other = encode(Message(MessageKind.UPDATE, 1, "client_0", "server",
                               tensors={"x": torch.zeros(150_000)}, meta={"n_examples": 1}))
        consumed = []
        try:
            _push(hostile, _counted(iter_frames([other], 12, 1024), consumed))
            raise AssertionError("an upload of other tensors was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "tensor names differ; missing 1: ['w']; unexpected 1: ['x']" in exc.details()
        assert sum(consumed) < len(other) // 2

        # 3. the right tensors: accepted; the round completes with both updates
        good = Message(MessageKind.UPDATE, 1, "client_0", "server", tensors={"w": torch.full((3,), 5.0)},
                       meta={"n_examples": 1})
        assert hostile.push(encode(good), timeout=10) == "accepted"
        replies = {m.sender: m for m in server.collect(1, CLIENTS, timeout=10)}
        assert set(replies) == set(CLIENTS)
        assert torch.equal(replies["client_0"].tensors["w"], torch.full((3,), 5.0))
        assert torch.equal(replies["client_1"].tensors["w"], torch.full((3,), 2.0))

        # 4. a late upload (its round has ended) is refused before its bytes: verdict 'late'
        consumed = []
        late = encode(Message(MessageKind.UPDATE, 1, "client_0", "server",
                              tensors={"w": torch.zeros(400_000)}, meta={"n_examples": 1}))
        frames = _counted(iter_frames([late], 11, 1024), consumed)
        try:
            _push(hostile, frames)
            raise AssertionError("a late upload was accepted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and exc.details().startswith("late")
        assert len(consumed) < 200
        assert hostile.push(encode(Message(MessageKind.EVAL_RESULT, 1, "client_0", "server")), 10) == "late"
        stats = server.stats()
        assert stats["rejected_messages"] == 3 and stats["late_replies"] == 2
        _finish(server, 1)
        honest.join(10)


def test_a_wrong_token_flood_loses_no_honest_reply_and_is_logged_in_summaries(certs, caplog):  # noqa: F811
    section = _section(certs)
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    stop = threading.Event()
    fired = [0]

    def flood():  # one connection, up to 64 wrong-token calls in flight, for a bounded time
        conn = _connect(section, address, "client_0", token="y" * 43)
        call = conn.channel.unary_unary(FETCH, request_serializer=None, response_deserializer=None)
        try:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                futures = [call.future(b"{}", metadata=conn.metadata, timeout=5) for _ in range(64)]
                for f in futures:
                    f.exception()
                fired[0] += len(futures)
        finally:
            conn.close()

    with _serving(section) as (server, address, conns):
        floods = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
        for t in floods:
            t.start()
        conns += [_connect(section, address, c) for c in CLIENTS]
        threads = [_echo(conn) for conn in conns]
        assert server.wait_for_clients(20) == CLIENTS
        started = fired[0]
        for round_ in (1, 2, 3):
            replies = _round(server, round_, {"w": torch.ones(3)}, timeout=20)
            assert set(replies) == set(CLIENTS), f"round {round_} lost a reply under the flood"
        during = fired[0] - started
        _finish(server, 3)
        stop.set()
        for t in [*floods, *threads]:
            t.join(30)
    stats = server.stats()
    assert during > 0 and stats["refused_calls"] >= during
    assert stats["shed_calls"] > 0  # beyond the refusal budget: shed before taking a worker
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # one line for the first refusal, then summaries (per address and 10 s), not one per call
    assert len(warnings) <= 12, len(warnings)
    assert any("refused" in r.getMessage() and "calls from" in r.getMessage() for r in warnings)
