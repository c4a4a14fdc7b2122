"""Where a simulation's clients live and how their state is checkpointed: the ClientHost seam.

The simulation talks to its clients only through a host: the byte endpoints the transport
delivers to, their example counts, where they write predictions, and their persistent state as
one flat dict for the server's checkpoints. `InProcessHost` keeps every client in this process on
the one shared model (today's only engine); another engine (Ray actors, say) is a second class
with these methods and a name in ENGINES, chosen by `federation.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from fedtune.algorithms.base import State
from fedtune.runtime.client import Client
from fedtune.runtime.setup import Setup
from fedtune.transport.inprocess import Endpoint, Replies


class ClientHost(Protocol):
    """The simulated clients of one run, wherever they are hosted."""

    def names(self) -> list[str]:
        """The clients, in registration order."""
        ...

    def endpoints(self) -> dict[str, Endpoint]:
        """Client -> where the transport delivers its messages (read when a run starts)."""
        ...

    def deliver(self, batch: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes | None]]:
        """One collect's messages, `(client, encoded request)` in send order, as a lazy iterable
        (each request is encoded when pulled: pull one at a time to hold one at a time); yield
        `(client, encoded reply or None)` for every request as it is done, in any order, a
        client's own requests answered in the order sent. The transport checks and counts the
        replies. A host runs the batch as it can: one after another, on parallel workers, or
        several clients trained together."""
        ...

    def example_counts(self) -> dict[str, int]:
        """Client -> its number of training examples (the server's bound on claims)."""
        ...

    def write_predictions_to(self, directory: Path) -> None:
        """Where the clients write their prediction files from now on."""
        ...

    def state_dict(self) -> State:
        """Every client's persistent algorithm state as one flat dict, `<client>/<tensor>`."""
        ...

    def load_state_dict(self, state: State) -> None:
        """Restore what state_dict returned (a resumed run)."""
        ...


class InProcessHost:
    """Every client in this process, on the shared model (Setup.client), taking turns."""

    def __init__(self, clients: dict[str, Client]):
        self.clients = dict(clients)

    @classmethod
    def from_setup(cls, setup: Setup) -> InProcessHost:
        """Every client of the recipe's split, built by `setup` (Setup.client) on its model."""
        return cls({name: setup.clients.client(name) for name in setup.data.clients})

    def names(self) -> list[str]:
        return list(self.clients)

    def endpoints(self) -> dict[str, Endpoint]:
        return {name: c.handle_bytes for name, c in self.clients.items()}

    def deliver(self, batch: Iterable[tuple[str, bytes]]) -> Replies:
        for name, data in batch:  # one at a time, in send order, on the shared model
            yield name, self.clients[name].handle_bytes(data)

    def example_counts(self) -> dict[str, int]:
        return {name: len(c.data.train) for name, c in self.clients.items()}

    def write_predictions_to(self, directory: Path) -> None:
        for client in self.clients.values():
            client.predictions_dir = directory

    def state_dict(self) -> State:
        return {f"{name}/{k}": v.contiguous() for name, c in self.clients.items()
                for k, v in c.state.items()}

    def load_state_dict(self, state: State) -> None:
        for c in self.clients.values():
            c.state.clear()
        for key, value in state.items():
            name, k = key.split("/", 1)
            self.clients[name].state[k] = value


def _ray_host(setup: Setup) -> ClientHost:
    from fedtune.runtime.ray_host import RayHost  # imports ray: only when the engine is chosen

    return RayHost.from_setup(setup)


ENGINES: dict[str, Callable[[Setup], ClientHost]] = {"inprocess": InProcessHost.from_setup,
                                                     "ray": _ray_host}


def client_host(engine: str, setup: Setup) -> ClientHost:
    """The host `federation.engine` names, with the recipe's clients built by `setup`."""
    return ENGINES[engine](setup)
