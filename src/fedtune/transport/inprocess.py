"""Simulation transport: real encoded bytes handed to client callables in one process, in order."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Mapping

from fedtune.errors import MessageError
from fedtune.transport.base import TrafficCounter
from fedtune.transport.codec import TensorSpec, decode, encode
from fedtune.transport.expect import ANSWERS, NO_TENSORS, Expectation, default_expectation
from fedtune.wire import Message, MessageKind

logger = logging.getLogger("fedtune.transport")

Endpoint = Callable[[bytes], bytes | None]


class InProcessTransport:
    """A ServerTransport whose clients are callables taking request bytes and returning reply bytes.

    Messages are really encoded and decoded, so byte counts and checks match a networked run.
    Delivery is strictly sequential in send order (simulated clients share one base model).
    """

    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        *,
        max_message_bytes: int = 2**31,
        on_delivery: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoints = dict(endpoints)
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
        while self._queue:
            message = self._queue.popleft()
            client, message_kind, message_round = message.receiver, message.kind, message.round
            data = encode(message)
            self.traffic.record(direction="down", client=client, round=message.round, nbytes=len(data))
            del message
            if self.on_delivery is not None:
                self.on_delivery(client)
            reply_bytes = self.endpoints[client](data)
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
