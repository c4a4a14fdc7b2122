"""Where a simulation's clients live and how their state is checkpointed: the ClientHost seam.

The simulation talks to its clients only through a host: the byte endpoints the transport
delivers to, their example counts, where they write predictions, and their persistent state as
one flat dict for the server's checkpoints. `InProcessHost` keeps every client in this process on
the one shared model (today's only engine); another engine (Ray actors, say) is a second class
with these methods and a name in ENGINES, chosen by `federation.engine`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Protocol

from fedtune.algorithms.base import State
from fedtune.errors import MessageError
from fedtune.runtime.batched import BatchedFits
from fedtune.runtime.client import Client
from fedtune.runtime.setup import Setup
from fedtune.transport.codec import read_header
from fedtune.transport.inprocess import Endpoint, Replies
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.hosting")


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

    def example_counts(self) -> Mapping[str, int]:
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
    """Every client in this process, on the shared model (Setup.client), taking turns.

    Clients are built when first needed (`lazy`): a client never sampled costs nothing beyond its
    split (no tokenisation, no Client object), so start-up and memory follow the clients that work.
    A FINISH for a client never built is dropped unbuilt (it has nothing to close); checkpointed
    state of a client not yet rebuilt after a resume is kept aside until it is."""

    def __init__(self, clients: Mapping[str, Client]):
        """Clients built already (tests; `lazy` builds them on demand)."""
        self._names = list(clients)
        self._build: Callable[[str], Client] = clients.__getitem__
        self._built: dict[str, Client] = dict(clients)
        self._pending: dict[str, State] = {}          # resumed state of clients not yet built
        self._predictions: Path | None = None
        self.clients: Mapping[str, Client] = _Clients(self)
        self.batched: BatchedFits | None = None   # federation.parallel_clients > 1

    @classmethod
    def lazy(cls, names: list[str], build: Callable[[str], Client]) -> InProcessHost:
        """The clients `names`, each built by `build(name)` the first time it is needed."""
        host = cls({})
        host._names, host._build = list(names), build
        return host

    @classmethod
    def from_setup(cls, setup: Setup) -> InProcessHost:
        """Every client of the recipe's split, built by `setup` (Setup.client) when first sampled."""
        host = cls.lazy(list(setup.data.clients), setup.clients.client)
        k = setup.recipe.federation.parallel_clients
        if k > 1 and setup.recipe.adapter.rank_per_client is not None:
            log.warning("federation.parallel_clients: clients of different LoRA ranks "
                        "(adapter.rank_per_client) train one after another")
        elif k > 1:
            host.batched = BatchedFits(setup.trainer, setup.slot.params, k)
        return host

    def client(self, name: str) -> Client:
        """The client `name`, built now if it was not yet (KeyError for a name not in the run)."""
        found = self._built.get(name)
        if found is not None:
            return found
        if name not in self._names:
            raise KeyError(name)
        client = self._build(name)
        client.state.update(self._pending.pop(name, {}))
        if self._predictions is not None:
            client.predictions_dir = self._predictions
        self._built[name] = client
        return client

    def built(self) -> list[str]:
        """The clients built so far, in the order they were built."""
        return list(self._built)

    def names(self) -> list[str]:
        return list(self._names)

    def endpoints(self) -> dict[str, Endpoint]:
        return {name: partial(self._deliver, name) for name in self._names}

    def _deliver(self, name: str, data: bytes) -> bytes | None:
        if name not in self._built and _is_finish(data):
            return None  # nothing to close on a client that never worked
        return self.client(name).handle_bytes(data)

    def example_counts(self) -> Mapping[str, int]:
        """Read when a client's reply is checked, by which time it is built: exact (its tokenized
        training examples), and no client is tokenized for it."""
        return _ExampleCounts(self)

    def deliver(self, batch: Iterable[tuple[str, bytes]]) -> Replies:
        if self.batched is None:
            for name, data in batch:  # one at a time, in send order, on the shared model
                yield name, self._deliver(name, data)
            return
        yield from self._deliver_batched(list(batch), self.batched)

    def _deliver_batched(self, items: list[tuple[str, bytes]], batched: BatchedFits) -> Replies:
        """FITs that can batch go in groups of up to `batched.k` (send order; a client's other
        messages never overtake its FIT); everything else one at a time. Replies in send order."""
        replies: dict[int, bytes | None] = {}
        group: list[tuple[int, Client, Message]] = []
        done = 0

        def flush() -> None:
            answers = batched.answer([(c, m) for _, c, m in group]) if group else []
            replies.update({i: a for (i, _, _), a in zip(group, answers)})
            group.clear()

        for i, (name, data) in enumerate(items):
            if name not in self._built and _is_finish(data):
                replies[i] = None
            else:
                client = self.client(name)
                msg = client.decode(data)
                if msg is not None and batched.accepts(client, msg) \
                        and all(c is not client for _, c, _ in group):
                    group.append((i, client, msg))
                    if len(group) < batched.k:
                        continue
                flush()
                if i not in replies:
                    replies[i] = None if msg is None else client.answer(msg, client.handle)
            while done in replies:
                yield items[done][0], replies.pop(done)
                done += 1
        flush()
        while done in replies:
            yield items[done][0], replies.pop(done)
            done += 1

    def write_predictions_to(self, directory: Path) -> None:
        self._predictions = directory
        for client in self._built.values():
            client.predictions_dir = directory

    def state_dict(self) -> State:
        state = {f"{name}/{k}": v for name, kept in self._pending.items() for k, v in kept.items()}
        state.update({f"{name}/{k}": v.contiguous() for name, c in self._built.items()
                      for k, v in c.state.items()})
        return state

    def load_state_dict(self, state: State) -> None:
        for c in self._built.values():
            c.state.clear()
        self._pending = {}
        for key, value in state.items():
            name, k = key.split("/", 1)
            if name in self._built:
                self._built[name].state[k] = value
            else:
                self._pending.setdefault(name, {})[k] = value


def _is_finish(data: bytes) -> bool:
    try:
        return read_header(data)["kind"] == MessageKind.FINISH.value
    except MessageError:
        return False  # the client itself refuses and counts it


class _Clients(Mapping[str, Client]):
    """The host's clients by name; reading one builds it."""

    def __init__(self, host: InProcessHost):
        self._host = host

    def __getitem__(self, name: str) -> Client:
        return self._host.client(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._host.names())

    def __len__(self) -> int:
        return len(self._host.names())


class _ExampleCounts(Mapping[str, int]):
    """Client -> its number of tokenized training examples (reading one builds that client)."""

    def __init__(self, host: InProcessHost):
        self._host = host

    def __getitem__(self, name: str) -> int:
        return len(self._host.client(name).data.train)

    def __iter__(self) -> Iterator[str]:
        return iter(self._host.names())

    def __len__(self) -> int:
        return len(self._host.names())


def _ray_host(setup: Setup) -> ClientHost:
    from fedtune.runtime.ray_host import RayHost  # imports ray: only when the engine is chosen

    return RayHost.from_setup(setup)


ENGINES: dict[str, Callable[[Setup], ClientHost]] = {"inprocess": InProcessHost.from_setup,
                                                     "ray": _ray_host}


def client_host(engine: str, setup: Setup) -> ClientHost:
    """The host `federation.engine` names, with the recipe's clients built by `setup`."""
    return ENGINES[engine](setup)
