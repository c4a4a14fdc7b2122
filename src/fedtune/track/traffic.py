"""The counter of encoded bytes that travel up and down, per round, client and direction."""

from __future__ import annotations

import threading
from typing import Any, Literal

from fedtune.errors import RunDirError

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down")


class TrafficCounter:
    """Encoded bytes per round, client and direction (down: server->client, up: client->server).

    Thread-safe, so a networked transport may record from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[int, dict[str, dict[str, int]]] = {}

    def record(self, *, direction: Direction, client: str, round: int, nbytes: int) -> None:
        """Add ``nbytes`` (the len() of one encoded message) to the totals."""
        _check_direction(direction)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        with self._lock:
            per_client = self._bytes.setdefault(round, {})
            counts = per_client.setdefault(client, {"up": 0, "down": 0})
            counts[direction] += nbytes

    def total(self, direction: Direction) -> int:
        """All bytes in one direction, over every round and client."""
        _check_direction(direction)
        with self._lock:
            return sum(
                counts[direction]
                for per_client in self._bytes.values()
                for counts in per_client.values()
            )

    def round_total(self, round: int, direction: Direction) -> int:
        """Bytes in one direction during one round, over every client."""
        _check_direction(direction)
        with self._lock:
            return sum(counts[direction] for counts in self._bytes.get(round, {}).values())

    def by_client(self, round: int) -> dict[str, dict[str, int]]:
        """``{client: {"up": n, "down": n}}`` for one round (a copy)."""
        with self._lock:
            return {client: dict(c) for client, c in self._bytes.get(round, {}).items()}

    def rounds(self) -> list[int]:
        """The rounds with any traffic, ascending."""
        with self._lock:
            return sorted(self._bytes)

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot, for checkpoints; ``load_state`` restores it."""
        with self._lock:
            return {
                "rounds": {
                    str(round_): {client: dict(c) for client, c in per_client.items()}
                    for round_, per_client in sorted(self._bytes.items())
                }
            }

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace the totals with a snapshot from ``state`` (so a resumed run continues them)."""
        try:
            loaded = {
                int(round_): {
                    str(client): {d: _count(c[d]) for d in DIRECTIONS}
                    for client, c in per_client.items()
                }
                for round_, per_client in state["rounds"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise RunDirError(
                f"traffic counter state is malformed ({error}); the checkpoint may be damaged"
            ) from error
        with self._lock:
            self._bytes = loaded


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"byte count {value!r} is not an int >= 0")
    return value


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
