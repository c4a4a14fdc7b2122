"""The gRPC transport on loopback, server and clients as threads: chunking, credentials, bad input,
late replies, reconnection (no model involved, so these are fast)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager

import grpc
import pytest
import torch

from fedtune.config import load_recipe
from fedtune.transport.auth import (
    Authenticator,
    call_metadata,
    client_token,
    load_tokens,
    server_credentials,
)
from fedtune.transport.certs import make_certs
from fedtune.transport.codec import decode, encode
from fedtune.transport.framing import FRAME, FRAME_MAGIC, LAST, iter_frames
from fedtune.transport.grpc_client import ServerConnection
from fedtune.transport.grpc_server import GrpcServerTransport
from fedtune.wire import Message, MessageKind

CLIENTS = ["client_0", "client_1"]


@pytest.fixture
def certs(tmp_path):
    make_certs(tmp_path / "certs", CLIENTS)
    return tmp_path / "certs"


def _section(certs, **transport):
    base = {"kind": "grpc", "address": "127.0.0.1:0", "chunk_bytes": 1024, "round_timeout": 10,
            "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem", "key": f"{certs}/server.key",
                    "client_cert": f"{certs}/{{name}}.pem", "client_key": f"{certs}/{{name}}.key"},
            "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token"}
    base.update(transport)
    return load_recipe({"federation": {"clients": 2}, "transport": base}).transport


def _start(section, **server_options):
    tokens = load_tokens(section.tokens) if section.tokens else None
    auth = Authenticator(CLIENTS, tokens, section.mutual_tls)
    creds = None if section.insecure else server_credentials(section.tls, section.mutual_tls)
    server = GrpcServerTransport(section, CLIENTS, auth, credentials=creds, **server_options)
    return server, server.start()


@contextmanager
def _serving(section, **server_options):
    """A started server, its address, and a list for client connections: all closed at the end."""
    server, address = _start(section, **server_options)
    conns: list[ServerConnection] = []
    try:
        yield server, address, conns
    finally:
        server.close()
        for conn in conns:
            conn.close()


def _connect(section, address, name, token="own"):
    if token == "own":
        token = client_token(section.token_file.replace("{name}", name), name) if section.token_file else None
    return ServerConnection(section, name, address=address, token=token)


def _echo(conn, factor=2.0, delay=0.0, seen=None):
    """A minimal client: answer FIT with factor × the tensors; stop at FINISH."""
    def run():
        try:
            for data in conn.messages():
                msg = decode(data)
                if seen is not None:
                    seen.append((msg.kind, msg.round))
                if msg.kind == MessageKind.FINISH:
                    return
                time.sleep(delay)
                reply = Message(MessageKind.UPDATE, msg.round, conn.name, "server",
                                tensors={k: v * factor for k, v in msg.tensors.items()},
                                meta={"n_examples": 1})
                conn.push(encode(reply), timeout=10)
        except grpc.RpcError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_connected(server, names, timeout=10.0):
    deadline = time.monotonic() + timeout
    while server.mailbox.connected() != names and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.mailbox.connected() == names


def _round(server, round_, tensors, clients=CLIENTS, timeout=10.0):
    for c in clients:
        server.send(Message(MessageKind.FIT, round_, "server", c, tensors=tensors, meta={"lr": 0.1}))
    return {m.sender: m for m in server.collect(round_, clients, timeout=timeout)}


def _finish(server, round_):
    for c in CLIENTS:
        server.send(Message(MessageKind.FINISH, round_, "server", c))
    server.collect(round_, [], timeout=10)


def test_messages_larger_than_a_chunk_cross_both_ways_and_bytes_are_counted(certs):
    section = _section(certs)
    with _serving(section) as (server, address, conns):
        conns += [_connect(section, address, c) for c in CLIENTS]
        threads = [_echo(conn) for conn in conns]
        assert server.wait_for_clients(10) == CLIENTS
        tensors = {"w": torch.randn(100, 100), "b": torch.arange(10)}  # ~40 KB, 40 chunks
        replies = _round(server, 1, tensors)
        assert set(replies) == set(CLIENTS)
        for c in CLIENTS:
            assert torch.equal(replies[c].tensors["w"], tensors["w"] * 2)
            sent = encode(Message(MessageKind.FIT, 1, "server", c, tensors=tensors, meta={"lr": 0.1}))
            got = encode(replies[c])
            assert server.traffic.by_client(1)[c] == {"down": len(sent), "up": len(got)}
        _finish(server, 1)
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        finish = len(encode(Message(MessageKind.FINISH, 1, "server", "client_0")))
        for c in CLIENTS:  # the last message of a stream is counted too
            assert server.traffic.by_client(1)[c]["down"] == len(sent) + finish
        assert server.stats()["dropped_messages"] == 0


def test_wrong_or_unknown_credentials_are_refused_and_logged(certs, caplog):
    section = _section(certs)
    server, address = _start(section)
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    try:
        wrong = _connect(section, address, "client_0", token="x" * 43)
        with pytest.raises(grpc.RpcError) as info:
            next(wrong.messages())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            wrong.push(encode(Message(MessageKind.UPDATE, 1, "client_0", "server")), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stranger = _connect(section, address, "client_9", token="x" * 43)
        with pytest.raises(grpc.RpcError):
            next(stranger.messages())
        assert server.stats()["refused_calls"] == 3
        assert server.mailbox.connected() == []
        # the first refusal from an address is logged at once, the others in one summary line
        lines = caplog.text.splitlines()
        assert len(lines) == 1 and "refused a call from 127.0.0.1: Pull: wrong or missing token " \
            "for client 'client_0'" in lines[0]
    finally:
        server.close()
    summary = caplog.text.splitlines()[1:]
    assert len(summary) == 1 and "refused 2 calls from 127.0.0.1" in summary[0]
    assert "1 x Push: wrong or missing token for client 'client_0'" in summary[0]
    assert "1 x Pull: unknown client 'client_9'" in summary[0]


def _push_frames(section, address, frames, name="client_0"):
    conn = _connect(section, address, name)
    try:
        return conn._push(iter(frames), metadata=conn.metadata, timeout=10)
    finally:
        conn.close()


def test_garbage_and_oversized_uploads_leave_the_server_serving(certs, caplog):
    section = _section(certs, max_message_bytes=200_000)
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    with _serving(section) as (server, address, conns):
        host, port = address.rsplit(":", 1)
        for garbage in (b"\x00\xff" * 5000, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x07" * 999):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(garbage)
        consumed = []

        def huge():  # declares 10 GB; the server must refuse at the first frame
            for index in range(10_000):
                consumed.append(index)
                yield FRAME.pack(FRAME_MAGIC, 1, index, 0, 10 * 1024**3) + b"x" * 1024

        for frames, code in [
            (huge(), grpc.StatusCode.INVALID_ARGUMENT),  # "too large: ...", not gRPC's busy code
            ([b"not a frame at all"], grpc.StatusCode.INVALID_ARGUMENT),
            (list(iter_frames([b"valid frames, not a message"], 1, 1024)), grpc.StatusCode.INVALID_ARGUMENT),
            # a frame over gRPC's message limit (chunk_bytes + slack)
            ([FRAME.pack(FRAME_MAGIC, 1, 0, LAST, 100_000) + b"x" * 100_000], grpc.StatusCode.RESOURCE_EXHAUSTED),
            (list(iter_frames([encode(Message(MessageKind.UPDATE, 1, "client_1", "server"))], 1, 1024)),
             grpc.StatusCode.INVALID_ARGUMENT),  # client_0 speaking as client_1
        ]:
            with pytest.raises(grpc.RpcError) as info:
                _push_frames(section, address, frames)
            assert info.value.code() == code, info.value.details()
        assert len(consumed) < 100  # refused early, not after reading 10 GB
        assert "too large: message of 10737418240 bytes is over the limit of 200000" in caplog.text
        assert server.stats()["rejected_messages"] >= 4
        assert "over the limit" in caplog.text and "is not the caller 'client_0'" in caplog.text

        conns += [_connect(section, address, c) for c in CLIENTS]
        threads = [_echo(conn) for conn in conns]
        assert server.wait_for_clients(10) == CLIENTS
        replies = _round(server, 1, {"w": torch.ones(3)})
        assert set(replies) == set(CLIENTS)
        _finish(server, 1)
        for t in threads:
            t.join(10)


def test_late_replies_are_discarded_and_counted(certs):
    section = _section(certs)
    with _serving(section) as (server, address, conns):
        conns += [_connect(section, address, c) for c in CLIENTS]
        _echo(conns[0])
        _echo(conns[1], delay=1.5)
        assert server.wait_for_clients(10) == CLIENTS
        start = time.monotonic()
        replies = _round(server, 1, {"w": torch.ones(3)}, timeout=0.5)
        assert list(replies) == ["client_0"] and time.monotonic() - start < 1.4
        deadline = time.monotonic() + 10
        while server.stats()["late_replies"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats()["late_replies"] == 1
        assert set(server.traffic.by_client(1)["client_1"]) == {"up", "down"}
        assert server.traffic.by_client(1)["client_1"]["up"] == 0  # late bytes are not the round's


def test_a_client_that_drops_and_comes_back_gets_the_next_messages_only(certs):
    section = _section(certs)
    server, address = _start(section)
    seen: list = []
    first = _connect(section, address, "client_0")
    later = None
    try:
        _echo(first, seen=seen)
        _wait_connected(server, ["client_0"])
        assert list(_round(server, 1, {"w": torch.ones(3)}, clients=["client_0"])) == ["client_0"]
        first.close()  # the client drops ...
        deadline = time.monotonic() + 10
        while server.mailbox.connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _round(server, 2, {"w": torch.ones(3)}, clients=["client_0"], timeout=0.3) == {}
        # ... its round-2 message is dropped when round 2 ends; round 3's is waiting for it.
        server.send(Message(MessageKind.FIT, 3, "server", "client_0", tensors={"w": torch.ones(3)},
                            meta={"lr": 0.1}))
        later = _connect(section, address, "client_0")
        _echo(later, seen=seen)
        replies = server.collect(3, ["client_0"], timeout=10)
        assert [m.round for m in replies] == [3]
        assert seen == [(MessageKind.FIT, 1), (MessageKind.FIT, 3)]
        assert server.stats()["rejoins"] == 1 and server.stats()["dropped_messages"] == 1
    finally:
        server.close()
        first.close()
        if later is not None:
            later.close()


def test_mutual_tls_identity_is_the_certificate_name(certs, caplog):
    section = _section(certs, mutual_tls=True, tokens=None, token_file=None)
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    with _serving(section) as (server, address, conns):
        impostor = _connect(section, address, "client_1")
        impostor.metadata = call_metadata("client_0", None)  # client_1's certificate, client_0's name
        conns.append(impostor)
        with pytest.raises(grpc.RpcError) as info:
            next(impostor.messages())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "claims to be 'client_0' but its certificate is 'client_1'" in caplog.text
        no_cert = _connect(_section(certs), address, "client_0")  # TLS without a client certificate
        conns.append(no_cert)
        with pytest.raises(grpc.RpcError) as info:
            next(no_cert.messages(idle_seconds=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        good = _connect(section, address, "client_0")
        conns.append(good)
        _echo(good)
        _wait_connected(server, ["client_0"])
        assert list(_round(server, 1, {"w": torch.ones(2)}, clients=["client_0"])) == ["client_0"]


def test_insecure_mode_warns_and_still_checks_tokens(certs, caplog):
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    section = _section(certs, insecure=True, tls={})
    server, address = _start(section)
    try:
        assert "NOT encrypted" in caplog.text
        wrong = _connect(section, address, "client_1", token="y" * 43)
        with pytest.raises(grpc.RpcError) as info:
            next(wrong.messages())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        conn = _connect(section, address, "client_1")
        _echo(conn)
        assert list(_round(server, 1, {"w": torch.ones(2)}, clients=["client_1"])) == ["client_1"]
        conn.close()
        wrong.close()
    finally:
        server.close()


def test_fetch_sends_a_download_in_chunks_counts_it_and_refuses_strangers(certs):
    section = _section(certs)
    shared = {"w": torch.arange(3000, dtype=torch.float32)}  # ~12 KB: a dozen 1 KB chunks
    made = []

    def package(client):
        made.append(client)
        return Message(MessageKind.DOWNLOAD, 0, "server", client, tensors=shared, meta={"format": 1})

    with _serving(section, downloads={"emulator": package}) as (server, address, opened):
        conns = {name: _connect(section, address, name) for name in CLIENTS}
        stranger = _connect(section, address, "client_1", token="wrong-token-" * 4)
        opened += [*conns.values(), stranger]
        progress = []
        data = conns["client_0"].fetch("emulator", on_progress=lambda got, total: progress.append(got))
        msg = decode(data)
        assert msg.kind == MessageKind.DOWNLOAD and msg.receiver == "client_0"
        assert torch.equal(msg.tensors["w"], shared["w"]) and msg.meta == {"format": 1}
        assert len(progress) > 10 and progress[-1] == len(data)
        assert server.traffic.total("down") == len(data)  # round-0 traffic of client_0
        assert server._download_encoder._tensors is shared  # kept for the others
        conns["client_1"].fetch("emulator")
        assert server._download_encoder._tensors is None  # everyone has it: dropped
        assert made == CLIENTS
        for conn, resource, code in [(conns["client_0"], "model", grpc.StatusCode.NOT_FOUND),
                                     (stranger, "emulator", grpc.StatusCode.UNAUTHENTICATED)]:
            with pytest.raises(grpc.RpcError) as info:
                conn.fetch(resource)
            assert info.value.code() == code
        assert server.stats()["refused_calls"] == 2
