"""The server side's bookkeeping for networked clients: outboxes, connections, pending requests.

Pure Python and thread-safe (one Condition), so the gRPC handlers and the Server's thread share
it and it can be tested without a network. A reply is accepted only if it answers a request that
is still pending; a request stops pending when the collect of its round ends, so anything that
arrives later is late: discarded and counted. Messages not yet delivered when their collect ends
are dropped, not replayed to a client that comes back later.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from fedtune.transport.base import TrafficCounter
from fedtune.transport.codec import TensorSpec
from fedtune.transport.expect import ANSWERS, NO_TENSORS, Expectation, default_expectation
from fedtune.transport.framing import Buffer
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.transport")

CLOSED = object()  # next_for(): this stream must end
_WAIT_SLICE = 1.0


@dataclass(eq=False)
class Outgoing:
    """One encoded message waiting in a client's outbox (head + shared tensor part)."""

    id: int
    round: int
    kind: MessageKind
    head: bytes
    body: Buffer
    cancelled: bool = False

    @property
    def size(self) -> int:
        return len(self.head) + len(self.body)


@dataclass
class _Client:
    outbox: deque[Outgoing] = field(default_factory=deque)
    pending: list[tuple[int, MessageKind]] = field(default_factory=list)
    session: int | None = None
    in_flight: tuple[int, Outgoing] | None = None
    pushing: bool = False
    joined: bool = False


@dataclass
class Counts:
    late: int = 0
    late_bytes: int = 0
    rejected: int = 0
    refused: int = 0
    shed: int = 0
    dropped: int = 0
    rejoined: int = 0

    def state(self) -> dict[str, int]:
        return dict(self.__dict__)

    def load_state(self, state: object) -> None:
        """Continue from a checkpoint's counts; anything malformed is ignored, named in the log."""
        if not isinstance(state, dict):
            return
        for key, value in state.items():
            if key in self.__dict__ and isinstance(value, int) and not isinstance(value, bool) \
                    and 0 <= value < 1 << 62:
                setattr(self, key, value)
            else:
                log.warning("checkpoint: ignored the transport count %r", str(key)[:40])


class Mailbox:
    def __init__(self, clients: Collection[str], traffic: TrafficCounter,
                 on_reply: Callable[[str], None] | None = None):
        self.traffic = traffic
        self.on_reply = on_reply
        self.counts = Counts()
        self._clients = {name: _Client() for name in clients}
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._sessions = itertools.count(1)
        self._replies: list[Message] = []
        self._expected: dict[tuple[str, int, MessageKind], Expectation] = {}
        self._closing = False

    # -- the Server's side ----------------------------------------------------------------------

    def put(self, client: str, round_: int, kind: MessageKind, head: bytes, body: Buffer) -> None:
        with self._cond:
            state = self._clients[client]
            state.outbox.append(Outgoing(next(self._ids), round_, kind, head, body))
            if kind in ANSWERS:
                state.pending.append((round_, kind))
            self._cond.notify_all()

    def expect(self, round_: int, answer: MessageKind, clients: Collection[str],
               specs: dict[str, TensorSpec] | None) -> None:
        """The tensors the `answer` of each of `clients` in `round_` must carry (until its collect)."""
        with self._cond:
            for client in clients:
                self._expected[(client, round_, answer)] = Expectation(dict(specs) if specs is not None else None)

    def expectation(self, client: str, round_: int, kind: MessageKind) -> Expectation | None:
        """What a reply of `kind` for `round_` must carry; None when no pending request awaits it."""
        with self._cond:
            for p_round, p_kind in self._clients[client].pending:
                if p_round != round_:
                    continue
                if kind == MessageKind.ERROR:
                    return NO_TENSORS
                if ANSWERS[p_kind] == kind:
                    return self._expected.get((client, round_, kind), default_expectation(kind))
        return None

    def expectation_pending(self, client: str) -> bool:
        """Whether any request of `client` still awaits an answer."""
        with self._cond:
            return bool(self._clients[client].pending)

    def upload_limit(self, client: str, ceiling: int) -> int:
        """The most bytes any reply `client` may send now: the largest of what its pending
        requests expect; with none pending, a tensor-free message (counted late if it arrives)."""
        with self._cond:
            pending = list(self._clients[client].pending)
            expected = [self._expected.get((client, r, ANSWERS[k]), default_expectation(ANSWERS[k]))
                        for r, k in pending]
        return max([NO_TENSORS.max_bytes(ceiling), *(e.max_bytes(ceiling) for e in expected)])

    def collect(self, round_: int, expected: Collection[str], timeout: float) -> list[Message]:
        """Every reply of `collect_each`, in a list."""
        return list(self.collect_each(round_, expected, timeout))

    def collect_each(self, round_: int, expected: Collection[str], timeout: float) -> Iterator[Message]:
        """Replies of `expected` for `round_`, each yielded (and forgotten here) as it arrives,
        until all arrived or `timeout` passed.

        With nothing expected, waits until every connected client has taken its messages. Then
        ends the exchange: pending requests are cancelled, undelivered messages dropped.
        """
        wanted = set(expected)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._cond:
                    ready = self._take(round_, wanted)
                    while not ready and not self._done(round_, wanted, seen):
                        left = deadline - time.monotonic()
                        if left <= 0 or self._closing:
                            break
                        self._cond.wait(min(left, _WAIT_SLICE))
                        ready = self._take(round_, wanted)
                if not ready:
                    break
                for message in ready:
                    seen.add(message.sender)
                    yield message
                del ready, message
        finally:
            self._end_exchange(round_)
        missing = sorted(wanted - seen)
        if missing:
            log.warning("round %d: no reply from %s within %g s", round_, ", ".join(missing), timeout)

    def _take(self, round_: int, wanted: set[str]) -> list[Message]:
        """Remove and return the arrived replies of `wanted` for `round_` (under the lock)."""
        got = [m for m in self._replies if m.round == round_ and m.sender in wanted]
        if got:
            self._replies = [m for m in self._replies if not (m.round == round_ and m.sender in wanted)]
        return got

    def _end_exchange(self, round_: int) -> None:
        with self._cond:
            self._replies.clear()
            self._expected.clear()
            for name, state in self._clients.items():
                state.pending.clear()
                for item in state.outbox:
                    item.cancelled = True
                if state.outbox:
                    self.counts.dropped += len(state.outbox)
                    log.info("round %d ended: %d undelivered message(s) for '%s' dropped",
                             round_, len(state.outbox), name)
                    state.outbox.clear()
                if state.in_flight is not None:
                    state.in_flight[1].cancelled = True

    def _done(self, round_: int, wanted: set[str], seen: set[str]) -> bool:
        if wanted:
            return wanted <= seen
        return all(not (s.outbox or s.in_flight) for s in self._clients.values() if s.session)

    def wait_for_clients(self, timeout: float) -> list[str]:
        """Wait until every client is connected or `timeout` passes; returns the connected ones."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(s.session for s in self._clients.values()):
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(min(left, _WAIT_SLICE))
            return [name for name, s in self._clients.items() if s.session]

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    # -- the streams' side ----------------------------------------------------------------------

    def connect(self, client: str) -> int:
        """A client opened its message stream; an older stream of the same client is superseded."""
        with self._cond:
            state = self._clients[client]
            session = next(self._sessions)
            if state.session is not None:
                log.info("client '%s' reconnected; its older stream is closed", client)
            self._requeue_in_flight(state)
            again = state.joined
            state.session, state.joined = session, True
            if again:
                self.counts.rejoined += 1
            joined = sum(s.session is not None for s in self._clients.values())
            self._cond.notify_all()
        log.info("client '%s' %s (%d of %d connected)", client, "rejoined" if again else "joined",
                 joined, len(self._clients))
        return session

    def disconnect(self, client: str, session: int) -> None:
        with self._cond:
            state = self._clients[client]
            if state.session == session:
                state.session = None
                self._requeue_in_flight(state)
                log.info("client '%s' disconnected", client)
            self._cond.notify_all()

    def next_for(self, client: str, session: int, timeout: float) -> Outgoing | object | None:
        """The next message to stream, None after `timeout` idle, CLOSED when the stream must end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            state = self._clients[client]
            while True:
                if self._closing or state.session != session:
                    return CLOSED
                if state.outbox:
                    item = state.outbox.popleft()
                    state.in_flight = (session, item)
                    return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, _WAIT_SLICE))

    def delivered(self, client: str, session: int, item: Outgoing) -> None:
        """The whole message went out on the stream: count its bytes as down."""
        with self._cond:
            state = self._clients[client]
            if state.in_flight == (session, item):
                state.in_flight = None
            self._cond.notify_all()
        self.traffic.record(direction="down", client=client, round=item.round, nbytes=item.size)

    def interrupted(self, client: str, session: int, item: Outgoing) -> None:
        """The stream broke mid-message: the message goes back to the front of the outbox."""
        with self._cond:
            state = self._clients[client]
            if state.in_flight == (session, item):
                self._requeue_in_flight(state)
            self._cond.notify_all()

    def _requeue_in_flight(self, state: _Client) -> None:
        if state.in_flight is not None:
            item = state.in_flight[1]
            state.in_flight = None
            if not item.cancelled:
                state.outbox.appendleft(item)

    # -- replies --------------------------------------------------------------------------------

    def begin_push(self, client: str) -> bool:
        """One upload at a time per client (bounds the memory an authenticated client can hold)."""
        with self._cond:
            state = self._clients[client]
            if state.pushing:
                return False
            state.pushing = True
            return True

    def end_push(self, client: str) -> None:
        with self._cond:
            self._clients[client].pushing = False

    def accept(self, message: Message, nbytes: int) -> bool:
        """Take a decoded reply whose sender is authenticated; False (counted as late) if no
        pending request of its round and kind awaits it."""
        client = message.sender
        with self._cond:
            state = self._clients[client]
            match = next((p for p in state.pending if p[0] == message.round and (
                message.kind == MessageKind.ERROR or ANSWERS[p[1]] == message.kind)), None)
            if match is None:
                self.counts.late += 1
                self.counts.late_bytes += nbytes
            else:
                state.pending.remove(match)
                self._replies.append(message)
                self._cond.notify_all()
        if match is None:
            log.warning("discarded a late or unrequested %s of round %d from '%s'",
                        message.kind.value, message.round, client)
            return False
        self.traffic.record(direction="up", client=client, round=message.round, nbytes=nbytes)
        if self.on_reply is not None:
            self.on_reply(client)
        return True

    def count(self, what: str, nbytes: int = 0) -> None:
        with self._cond:
            setattr(self.counts, what, getattr(self.counts, what) + 1)
            if what == "late":
                self.counts.late_bytes += nbytes

    def knows(self, client: str) -> bool:
        return client in self._clients

    def connected(self) -> list[str]:
        with self._cond:
            return [name for name, s in self._clients.items() if s.session]
