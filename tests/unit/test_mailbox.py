"""The server's bookkeeping for networked clients: deadlines, late replies, drops, rejoins."""

from __future__ import annotations

import threading
import time

from fedtune.transport.base import TrafficCounter
from fedtune.transport.mailbox import CLOSED, Mailbox
from fedtune.wire import Message, MessageKind

CLIENTS = ["a", "b", "c"]


def _box():
    return Mailbox(CLIENTS, TrafficCounter())


def _update(client, round_, kind=MessageKind.UPDATE):
    return Message(kind, round_, client, "server")


def _fit(box, client, round_, size=10):
    box.put(client, round_, MessageKind.FIT, b"h" * 4, b"x" * (size - 4))


def test_collect_returns_when_all_replied_and_counts_bytes():
    box = _box()
    for c in CLIENTS:
        box.connect(c)
        _fit(box, c, 1)
    for c in CLIENTS:
        s = box._clients[c].session
        item = box.next_for(c, s, 0.1)
        box.delivered(c, s, item)
        assert box.accept(_update(c, 1), 25)
    start = time.monotonic()
    got = box.collect(1, CLIENTS, timeout=30)
    assert time.monotonic() - start < 1
    assert sorted(m.sender for m in got) == CLIENTS
    assert box.traffic.by_client(1) == {c: {"up": 25, "down": 10} for c in CLIENTS}


def test_deadline_late_replies_and_undelivered_messages_are_dropped():
    box = _box()
    for c in CLIENTS:
        _fit(box, c, 1)
    box.accept(_update("a", 1), 5)
    start = time.monotonic()
    got = box.collect(1, CLIENTS, timeout=0.3)
    assert 0.25 < time.monotonic() - start < 2
    assert [m.sender for m in got] == ["a"]
    # b's reply after the deadline: late, discarded, counted; the undelivered FITs were dropped.
    assert not box.accept(_update("b", 1), 7)
    assert box.counts.late == 1 and box.counts.late_bytes == 7 and box.counts.dropped == 3
    s = box.connect("b")
    assert box.next_for("b", s, 0.05) is None
    # Replies nobody asked for (wrong kind, wrong round) are late too.
    _fit(box, "a", 2)
    assert not box.accept(_update("a", 2, MessageKind.EVAL_RESULT), 1)
    assert not box.accept(_update("a", 1), 1)
    assert box.accept(_update("a", 2, MessageKind.ERROR), 1)  # an error answers any request
    assert not box.accept(_update("a", 2), 1)  # answered already
    assert box.counts.late == 4


def test_interrupted_stream_requeues_and_a_rejoining_client_gets_its_next_message():
    box = _box()
    first = box.connect("a")
    _fit(box, "a", 1)
    item = box.next_for("a", first, 0.1)
    box.disconnect("a", first)  # the connection broke while streaming: the message goes back
    box.interrupted("a", first, item)
    again = box.connect("a")
    assert box.counts.rejoined == 1
    assert box.next_for("a", again, 0.1) is item
    assert box.next_for("a", first, 0.1) is CLOSED  # the old stream ends


def test_a_newer_stream_supersedes_the_older_one():
    box = _box()
    old = box.connect("a")
    new = box.connect("a")
    assert box.next_for("a", old, 0.1) is CLOSED
    assert box.next_for("a", new, 0.05) is None


def test_collect_with_nothing_expected_waits_for_connected_clients_to_take_their_messages():
    box = _box()
    s = box.connect("a")
    for c in CLIENTS:  # b and c are not connected: their messages do not hold up the end
        box.put(c, 5, MessageKind.FINISH, b"f", b"")

    def take():
        time.sleep(0.2)
        box.delivered("a", s, box.next_for("a", s, 1))

    threading.Thread(target=take).start()
    start = time.monotonic()
    box.collect(5, [], timeout=10)
    assert 0.15 < time.monotonic() - start < 2
    assert box.traffic.by_client(5) == {"a": {"up": 0, "down": 1}}
    assert box.counts.dropped == 2


def test_wait_for_clients_is_bounded_and_close_wakes_everyone():
    box = _box()
    box.connect("a")
    start = time.monotonic()
    assert box.wait_for_clients(0.2) == ["a"]
    assert time.monotonic() - start < 2
    threading.Timer(0.1, box.close).start()
    start = time.monotonic()
    box.collect(1, ["b"], timeout=30)
    assert time.monotonic() - start < 2


def test_one_upload_at_a_time_per_client():
    box = _box()
    assert box.begin_push("a") and not box.begin_push("a") and box.begin_push("b")
    box.end_push("a")
    assert box.begin_push("a")
