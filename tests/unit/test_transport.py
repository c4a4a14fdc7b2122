"""Tests for byte accounting and the in-process transport."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedtune.errors import MessageError, RunDirError
from fedtune.transport.base import ServerTransport, TrafficCounter
from fedtune.transport.codec import decode, encode
from fedtune.transport.inprocess import InProcessTransport, sequential
from fedtune.wire import Message, MessageKind

# ---------------------------------------------------------------- TrafficCounter


def filled_counter() -> TrafficCounter:
    counter = TrafficCounter()
    counter.record(direction="down", client="a", round=0, nbytes=100)
    counter.record(direction="up", client="a", round=0, nbytes=30)
    counter.record(direction="down", client="b", round=0, nbytes=100)
    counter.record(direction="down", client="a", round=1, nbytes=100)
    counter.record(direction="up", client="a", round=1, nbytes=25)
    counter.record(direction="up", client="a", round=1, nbytes=5)
    return counter


def test_traffic_counter_arithmetic():
    counter = filled_counter()
    assert counter.total("down") == 300
    assert counter.total("up") == 60
    assert counter.round_total(0, "down") == 200
    assert counter.round_total(0, "up") == 30
    assert counter.round_total(1, "up") == 30
    assert counter.round_total(7, "up") == 0
    assert counter.by_client(0) == {"a": {"up": 30, "down": 100}, "b": {"up": 0, "down": 100}}
    assert counter.by_client(1) == {"a": {"up": 30, "down": 100}}
    assert counter.by_client(9) == {}
    assert counter.rounds() == [0, 1]


def test_traffic_counter_by_client_is_a_copy():
    counter = filled_counter()
    counter.by_client(0)["a"]["up"] = 10**9
    assert counter.total("up") == 60


def test_traffic_counter_state_round_trips_through_json():
    counter = filled_counter()
    resumed = TrafficCounter()
    resumed.load_state(json.loads(json.dumps(counter.state())))
    resumed.record(direction="up", client="b", round=2, nbytes=8)
    assert resumed.total("up") == 68
    assert resumed.total("down") == 300
    assert resumed.by_client(0) == counter.by_client(0)


@pytest.mark.parametrize(
    "state",
    [{}, {"rounds": {"x": {}}}, {"rounds": {"0": {"a": {"up": -1, "down": 0}}}}, {"rounds": []}],
)
def test_traffic_counter_bad_state(state):
    with pytest.raises(RunDirError, match="traffic counter state"):
        TrafficCounter().load_state(state)


def test_traffic_counter_bad_arguments():
    counter = TrafficCounter()
    with pytest.raises(ValueError, match="direction"):
        counter.record(direction="sideways", client="a", round=0, nbytes=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nbytes"):
        counter.record(direction="up", client="a", round=0, nbytes=-1)


# ---------------------------------------------------------------- InProcessTransport


def fit(client: str, round_: int = 1) -> Message:
    return Message(MessageKind.FIT, round_, "server", client, {"w": torch.ones(3, 2)}, {"lr": 0.01})


def echo_client(name: str, log: list[str]):
    """A client that answers FIT with an UPDATE of doubled tensors."""

    def endpoint(data: bytes) -> bytes | None:
        msg = decode(data)
        log.append(f"{name}:{msg.kind.value}")
        if msg.kind is not MessageKind.FIT:
            return None
        tensors = {k: v * 2 for k, v in msg.tensors.items()}
        reply = Message(MessageKind.UPDATE, msg.round, name, "server", tensors, {"n_examples": 4})
        return encode(reply)

    return endpoint


def test_in_process_transport_is_a_server_transport():
    assert isinstance(InProcessTransport({}), ServerTransport)


def test_byte_counts_and_order():
    log: list[str] = []
    names = ["c2", "c0", "c1"]
    transport = InProcessTransport({n: echo_client(n, log) for n in names})
    for name in names:
        transport.send(fit(name))
    replies = transport.collect(1, expected=names)
    assert [r.sender for r in replies] == names
    assert log == ["c2:fit", "c0:fit", "c1:fit"]
    assert torch.equal(replies[0].tensors["w"], torch.full((3, 2), 2.0))
    down = len(encode(fit("c0")))
    up = len(encode(replies[1]))
    assert transport.traffic.by_client(1) == {n: {"up": up, "down": down} for n in names}
    assert transport.traffic.total("down") == 3 * down
    assert transport.traffic.round_total(1, "up") == 3 * up
    assert transport.rejected == []


def test_garbage_reply_rejected_others_returned(caplog):
    log: list[str] = []
    endpoints = {n: echo_client(n, log) for n in ["a", "c"]}
    endpoints["b"] = lambda data: b"FTM1 not really a message"
    transport = InProcessTransport(endpoints)
    for name in ["a", "b", "c"]:
        transport.send(fit(name))
    with caplog.at_level(logging.WARNING, logger="fedtune.transport"):
        replies = transport.collect(1, expected=["a", "b", "c"])
    assert [r.sender for r in replies] == ["a", "c"]
    assert len(transport.rejected) == 1 and transport.rejected[0][0] == "b"
    assert "client 'b'" in caplog.text
    assert transport.traffic.by_client(1)["b"]["up"] == len(b"FTM1 not really a message")


def test_wrong_round_rejected():
    def stale(data: bytes) -> bytes:
        return encode(Message(MessageKind.UPDATE, 0, "a", "server"))

    transport = InProcessTransport({"a": stale})
    transport.send(fit("a", round_=1))
    assert transport.collect(1, expected=["a"]) == []
    assert transport.rejected == [("a", "round 0 but expected 1")]


def test_impostor_and_unexpected_senders_rejected():
    log: list[str] = []
    endpoints = {"a": echo_client("b", log), "b": echo_client("b", log)}
    transport = InProcessTransport(endpoints)
    transport.send(fit("a"))
    transport.send(fit("b"))
    assert transport.collect(1, expected=["a"]) == []
    reasons = [reason for _, reason in transport.rejected]
    assert reasons == [
        "sender 'b' but the reply came from 'a'",
        "sender 'b' is not expected in round 1",
    ]


def test_oversize_reply_rejected():
    log: list[str] = []
    transport = InProcessTransport({"a": echo_client("a", log)}, max_message_bytes=64)
    transport.send(fit("a"))
    assert transport.collect(1, expected=["a"]) == []
    assert "over the limit of 64" in transport.rejected[0][1]


def test_unknown_receiver_and_hook_and_close():
    log: list[str] = []
    delivered: list[str] = []
    transport = InProcessTransport(
        {"a": echo_client("a", log), "b": echo_client("b", log)}, on_delivery=delivered.append
    )
    with pytest.raises(MessageError, match="receiver 'zed'"):
        transport.send(fit("zed"))
    transport.send(Message(MessageKind.FINISH, 1, "server", "b"))
    transport.send(fit("a"))
    replies = transport.collect(1, expected=["a", "b"])
    assert delivered == ["b", "a"] and [r.sender for r in replies] == ["a"]
    transport.send(fit("a"))
    transport.close()
    assert transport.collect(1, expected=["a"]) == []
    assert delivered == ["b", "a"]


def test_sequential_delivery_encodes_each_request_when_pulled():
    """The default delivery pulls one request, answers it, then pulls the next: at most one
    encoded request is alive, and its bytes are counted only when it is pulled."""
    log: list[str] = []
    transport = InProcessTransport({n: echo_client(n, log) for n in ["a", "b"]})
    seen_down: list[int] = []

    def endpoint_with_probe(name):
        inner = echo_client(name, log)

        def endpoint(data: bytes):
            seen_down.append(transport.traffic.total("down"))
            return inner(data)
        return endpoint

    transport.endpoints = {n: endpoint_with_probe(n) for n in ["a", "b"]}
    transport.deliver = sequential(transport.endpoints)
    transport.send(fit("a"))
    transport.send(fit("b"))
    transport.collect(1, expected=["a", "b"])
    down = len(encode(fit("a")))
    assert seen_down == [down, 2 * down]  # b's request was not encoded while a trained


def test_batched_host_delivery_answers_out_of_order():
    """A host's deliver gets the whole batch (so it can run clients in parallel) and may yield
    the replies in any order; each is checked against what its own client was sent."""
    log: list[str] = []
    endpoints = {n: echo_client(n, log) for n in ["a", "b", "c"]}
    batches: list[list[str]] = []

    def deliver(batch):
        requests = list(batch)  # the whole round at once
        batches.append([client for client, _ in requests])
        # clients in reverse, each client's own requests in the order sent (a stable sort)
        for client, data in sorted(requests, key=lambda r: r[0], reverse=True):
            yield client, endpoints[client](data)

    delivered: list[str] = []
    transport = InProcessTransport(endpoints, deliver=deliver, on_delivery=delivered.append)
    for name in ["a", "b", "c"]:
        transport.send(fit(name))
    transport.send(Message(MessageKind.FINISH, 1, "server", "b"))
    replies = transport.collect(1, expected=["a", "b", "c"])
    assert batches == [["a", "b", "c", "b"]]
    assert [r.sender for r in replies] == ["c", "b", "a"]
    assert delivered == ["c", "b", "b", "a"] and log[1:3] == ["b:fit", "b:finish"]
    assert transport.traffic.total("down") == 3 * len(encode(fit("a"))) + len(
        encode(Message(MessageKind.FINISH, 1, "server", "b")))
    assert transport.rejected == []


def test_host_replying_for_a_client_it_was_not_sent_is_an_error():
    def deliver(batch):
        for _client, _data in batch:
            yield "zed", None

    transport = InProcessTransport({"a": lambda data: None}, deliver=deliver)
    transport.send(fit("a"))
    with pytest.raises(TypeError, match="'zed', which it was not sent"):
        transport.collect(1, expected=["a"])
