"""The server-side transport interface (the byte counter it keeps: fedtune.track.traffic)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fedtune.track.traffic import DIRECTIONS, Direction, TrafficCounter
from fedtune.wire import Message, MessageKind

if TYPE_CHECKING:
    from fedtune.wire import TensorSpec

__all__ = ["DIRECTIONS", "Direction", "ServerTransport", "TrafficCounter"]


@runtime_checkable
class ServerTransport(Protocol):
    """How the server reaches clients; the same Server runs over in-process queues or gRPC."""

    traffic: TrafficCounter

    def send(self, message: Message) -> None:
        """Encode and queue ``message`` for ``message.receiver``; count its bytes as down."""
        ...

    def expect(self, round: int, answer: MessageKind, clients: Collection[str],
               specs: Mapping[str, TensorSpec] | None) -> None:
        """Replies of kind ``answer`` in ``round`` from ``clients`` must carry exactly these
        tensors (until that round's collect ends); anything larger or different is refused."""
        ...

    def collect(
        self, round: int, expected: Collection[str], timeout: float | None = None
    ) -> list[Message]:
        """Deliver what was sent and return the valid replies of ``expected`` clients for ``round``."""
        ...

    def collect_each(
        self, round: int, expected: Collection[str], timeout: float | None = None
    ) -> Iterator[Message]:
        """As ``collect``, each valid reply yielded as it arrives and not kept by the transport
        (the server's streaming aggregation holds O(1) updates). Consume it to the end: the
        exchange ends (and the round's leftovers are dropped) when it does."""
        ...

    def counter_state(self) -> dict[str, int]:
        """The transport's own counts (late replies, refused calls...) for a checkpoint; {} for
        one that keeps none."""
        ...

    def load_counter_state(self, state: object) -> None:
        """Continue the counts of a checkpoint (a resumed server)."""
        ...

    def close(self) -> None:
        """Release queues and connections."""
        ...
