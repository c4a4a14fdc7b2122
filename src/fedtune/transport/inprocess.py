"""Simulation transport: real encoded bytes handed to the simulated clients' host, in batches.

Each `collect` hands the host the round's messages together through one `Deliver` call (a lazy
batch of `(client, request bytes)`), so a host may run its clients in parallel (Ray actors,
batched training) or one after another (`sequential`, the default: today's in-process order).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

from fedtune.errors import MessageError
from fedtune.transport.base import TrafficCounter
from fedtune.transport.codec import TensorSpec, decode, encode
from fedtune.transport.expect import ANSWERS, NO_TENSORS, Expectation, default_expectation
from fedtune.wire import Message, MessageKind

logger = logging.getLogger("fedtune.transport")

Endpoint = Callable[[bytes], bytes | None]
Batch = Iterable[tuple[str, bytes]]              # (client, encoded request), encoded when pulled
Replies = Iterator[tuple[str, bytes | None]]     # (client, encoded reply or None), as each is done
Deliver = Callable[[Batch], Replies]


def sequential(endpoints: Mapping[str, Endpoint]) -> Deliver:
    """Delivery one message at a time in batch order: pull a request, call its client, yield the
    reply, pull the next (so one encoded request is alive at a time)."""
    def deliver(batch: Batch) -> Replies:
        for client, data in batch:
            yield client, endpoints[client](data)
    return deliver


class InProcessTransport:
    """A ServerTransport whose clients are callables taking request bytes and returning reply bytes.

    Messages are really encoded and decoded, so byte counts and checks match a networked run.
    `deliver` (a ClientHost's `deliver`) receives each collect's messages as one lazy batch, in
    send order, and yields the replies as they are done, in any order; a client's own messages
    must be answered in the order sent. Without it, `sequential(endpoints)`. `on_delivery(client)`
    is called as each delivery is done (the progress display).
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        *,
        max_message_bytes: int = 2**31,
        on_delivery: Callable[[str], None] | None = None,
        deliver: Deliver | None = None,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.deliver = deliver or sequential(self.endpoints)
        self.max_message_bytes = max_message_bytes
        self.on_delivery = on_delivery
        self.traffic = TrafficCounter()
        self.rejected: list[tuple[str, str]] = []
        self._queue: deque[Message] = deque()
        self._expected: dict[tuple[str, int, MessageKind], Expectation] = {}

    def expect(self, round: int, answer: MessageKind, clients: Collection[str],
               specs: Mapping[str, TensorSpec] | None) -> None:
        """As the gRPC transport, replies larger than these tensors allow are rejected before they
        are decoded; their names, shapes and dtypes are left to the Server's checks (the bytes are
        in memory already, and the Server logs and counts what it rejects)."""
        for client in clients:
            self._expected[(client, round, answer)] = Expectation(None if specs is None else dict(specs))

    def counter_state(self) -> dict[str, int]:
        return {}  # nothing is late or refused in process: every count is in `traffic`

    def load_counter_state(self, state: object) -> None:
        return None

    def send(self, message: Message) -> None:
        """Queue ``message`` for its receiver.

        It is encoded (and its down-bytes counted) when delivered, so a round with many clients
        holds one encoded copy of the global adapter at a time, not one per client.
        """
        if message.receiver not in self.endpoints:
            raise MessageError(f"receiver '{message.receiver}' is not a known client")
        self._queue.append(message)

    def collect(
        self, round: int, expected: Collection[str], timeout: float | None = None
    ) -> list[Message]:
        """Deliver every queued message in send order; return valid replies from ``expected``.

        ``timeout`` is accepted for interface parity and ignored: delivery is a direct call.
        A reply is rejected (logged, kept in ``rejected``) if it does not decode, or if its
        sender is not the client that produced it or not expected, or its round differs.
        """
        del timeout
        expected_set = set(expected)
        replies: list[Message] = []
        sent: dict[str, deque[tuple[MessageKind, int]]] = {}  # per client: what it was asked
        for client, reply_bytes in self.deliver(self._requests(sent)):
            if not sent.get(client):
                raise TypeError(f"the client host replied for '{client}', which it was not sent")
            message_kind, message_round = sent[client].popleft()
            if self.on_delivery is not None:
                self.on_delivery(client)
            if reply_bytes is None:
                continue
            if not isinstance(reply_bytes, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"endpoint '{client}' returned {type(reply_bytes).__name__}, not bytes or None"
                )
            self.traffic.record(direction="up", client=client, round=round, nbytes=len(reply_bytes))
            answer = ANSWERS.get(message_kind)
            expectation = NO_TENSORS if answer is None else self._expected.get(
                (client, message_round, answer), default_expectation(answer))
            try:
                reply = decode(reply_bytes, max_bytes=expectation.max_bytes(self.max_message_bytes))
                _check_reply(reply, client=client, round=round, expected=expected_set)
            except MessageError as error:
                self._reject(client, str(error))
                continue
            replies.append(reply)
        self._expected.clear()
        return replies

    def _requests(self, sent: dict[str, deque[tuple[MessageKind, int]]]) -> Iterator[tuple[str, bytes]]:
        """The queued messages, each encoded (and its down-bytes counted) only when the host
        pulls it; what each client was asked is noted in `sent` for checking its reply."""
        while self._queue:
            message = self._queue.popleft()
            client = message.receiver
            sent.setdefault(client, deque()).append((message.kind, message.round))
            data = encode(message)
            self.traffic.record(direction="down", client=client, round=message.round, nbytes=len(data))
            del message
            yield client, data

    def close(self) -> None:
        """Drop anything still queued."""
        self._queue.clear()

    def _reject(self, client: str, reason: str) -> None:
        logger.warning("rejected a message from client '%s': %s", client, reason)
        self.rejected.append((client, reason))


def _check_reply(reply: Message, *, client: str, round: int, expected: set[str]) -> None:
    if reply.sender != client:
        raise MessageError(f"sender '{reply.sender}' but the reply came from '{client}'")
    if reply.sender not in expected:
        raise MessageError(f"sender '{reply.sender}' is not expected in round {round}")
    if reply.round != round:
        raise MessageError(f"round {reply.round} but expected {round}")
