"""Simulated clients in Ray actors (`federation.engine: ray`): a ClientHost for clusters.

Each actor builds the recipe's party itself (data, ONE base model with its adapter slot: a Setup)
and hosts a fixed share of the clients on it, taking turns as the in-process host does, so a
client's persistent state lives with its actor. Actors are handed only plain values: the recipe
as a JSON-able dict, client names, the codec's encoded messages, and client state as safetensors
bytes (gathered to the driver for checkpoints). Ray is imported only here, when the engine starts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedtune.algorithms.base import State
from fedtune.errors import FedtuneError
from fedtune.runtime.setup import Setup
from fedtune.transport.inprocess import Endpoint, Replies

log = logging.getLogger("fedtune.ray")


class ClientActor:
    """One actor's clients on its own copy of the base model (made a Ray actor by RayHost)."""

    def __init__(self, recipe: dict[str, Any], names: list[str]):
        from rich.console import Console

        from fedtune.config import load_recipe

        self.setup = Setup(load_recipe(recipe), Console(quiet=True))
        self.clients = {name: self.setup.clients.client(name) for name in names}

    def example_counts(self) -> dict[str, int]:
        return {name: len(c.data.train) for name, c in self.clients.items()}

    def handle(self, name: str, data: bytes) -> bytes | None:
        return self.clients[name].handle_bytes(data)

    def write_predictions_to(self, directory: str) -> None:
        for client in self.clients.values():
            client.predictions_dir = Path(directory)

    def state(self) -> bytes:
        """Every hosted client's persistent state, `<client>/<tensor>`, as safetensors bytes."""
        from safetensors.torch import save

        return save({f"{name}/{k}": v.detach().contiguous().clone()
                     for name, c in self.clients.items() for k, v in c.state.items()})

    def load_state(self, data: bytes) -> None:
        from safetensors.torch import load

        for c in self.clients.values():
            c.state.clear()
        for key, value in load(data).items():
            name, k = key.split("/", 1)
            self.clients[name].state[k] = value


class RayHost:
    """The recipe's clients spread over `federation.ray.num_actors` Ray actors (client i on
    actor i mod n, for the whole run). `deliver` submits a collect's whole batch, so the actors
    work in parallel, and yields the replies in batch order (the in-process engine's order, so
    results are identical). An actor that dies is restarted by Ray; the requests it had are
    answered None (its clients are missing from that round, as a dropped client is in
    deployment) and its clients' state is restored from the last checkpoint's."""

    def __init__(self, setup: Setup):
        recipe = setup.recipe
        section = recipe.federation.ray
        self.ray = _ray()
        self.started = _connect(self.ray, section)
        self.order = list(setup.data.clients)
        n = min(section.num_actors, len(self.order))
        shares = [[name for i, name in enumerate(self.order) if i % n == a] for a in range(n)]
        remote = self.ray.remote(ClientActor).options(
            num_cpus=section.cpus_per_actor, num_gpus=section.gpus_per_actor,
            max_restarts=-1, max_task_retries=0)
        plain = recipe.model_dump(mode="json")
        self.actors = [remote.remote(plain, share) for share in shares]
        self.actor_of = {name: a for a, share in enumerate(shares) for name in share}
        self.saved: list[bytes | None] = [None] * n   # each actor's state at the last gathering
        self.predictions: str | None = None
        self.counts: dict[str, int] = {}
        try:
            for counts in self.ray.get([actor.example_counts.remote() for actor in self.actors]):
                self.counts.update(counts)
        except self.ray.exceptions.RayError as exc:
            self.close()
            raise FedtuneError(f"federation.engine ray: an actor could not build its clients: {exc}") from None

    @classmethod
    def from_setup(cls, setup: Setup) -> RayHost:
        return cls(setup)

    def names_of(self, actor: int) -> list[str]:
        return [name for name in self.order if self.actor_of[name] == actor]

    # -- the ClientHost seam --------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.order)

    def endpoints(self) -> dict[str, Endpoint]:
        """One remote call per message (the relay path; `deliver` is the parallel one)."""
        def endpoint(name: str) -> Endpoint:
            return lambda data: list(self.deliver([(name, data)]))[0][1]
        return {name: endpoint(name) for name in self.order}

    def deliver(self, batch: Iterable[tuple[str, bytes]]) -> Replies:
        pending = [(name, self.actors[self.actor_of[name]].handle.remote(name, data))
                   for name, data in batch]   # all submitted: every actor works at once
        lost: set[int] = set()
        for name, ref in pending:   # batch order, as the in-process host answers
            actor = self.actor_of[name]
            reply: bytes | None = None
            if actor not in lost:
                try:
                    reply = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as exc:
                    lost.add(actor)
                    log.warning("ray actor %d died (%s); its clients miss this delivery and it is "
                                "restarted", actor, type(exc).__name__)
            yield name, reply
        for actor in sorted(lost):
            self._revive(actor)

    def example_counts(self) -> dict[str, int]:
        return dict(self.counts)

    def write_predictions_to(self, directory: Path) -> None:
        self.predictions = str(directory)
        self.ray.get([a.write_predictions_to.remote(self.predictions) for a in self.actors])

    def state_dict(self) -> State:
        from safetensors.torch import load

        self.saved = list(self.ray.get([a.state.remote() for a in self.actors]))
        return {k: v for data in self.saved for k, v in load(data).items()}

    def load_state_dict(self, state: State) -> None:
        from safetensors.torch import save

        parts: list[dict[str, Any]] = [{} for _ in self.actors]
        for key, value in state.items():
            name = key.split("/", 1)[0]
            if name not in self.actor_of:
                raise FedtuneError(f"checkpoint client state names client {name!r}, not in this federation")
            parts[self.actor_of[name]][key] = value.contiguous()
        self.saved = [save(part) for part in parts]
        self.ray.get([a.load_state.remote(data) for a, data in zip(self.actors, self.saved)])

    def close(self) -> None:
        """Stop the actors, and the local Ray this host started."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started:
            self.ray.shutdown()

    def _revive(self, actor: int, wait: float = 300.0) -> None:
        """A restarted actor gets back its clients' last checkpointed state and where to write
        (waiting up to `wait` seconds while Ray restarts it)."""
        handle, deadline = self.actors[actor], time.monotonic() + wait
        while True:
            try:
                self.ray.get(handle.example_counts.remote())  # it is up again
                break
            except self.ray.exceptions.ActorUnavailableError:  # restarting
                if time.monotonic() > deadline:
                    raise FedtuneError(f"ray actor {actor} did not restart within {wait:g} s") from None
                time.sleep(0.5)
            except self.ray.exceptions.RayActorError as exc:
                raise FedtuneError(f"ray actor {actor} did not come back after a failure: {exc}") from None
        calls = [handle.load_state.remote(self.saved[actor])] if self.saved[actor] else []
        if self.predictions is not None:
            calls.append(handle.write_predictions_to.remote(self.predictions))
        self.ray.get(calls)
        if self.saved[actor] is None:
            log.warning("ray actor %d restarted: its clients %s start with no persistent state "
                        "(no checkpoint yet)", actor, self.names_of(actor))
        else:
            log.warning("ray actor %d restarted: its clients %s continue from the last "
                        "checkpoint's state", actor, self.names_of(actor))


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FedtuneError("federation.engine ray needs Ray: pip install 'fedtune[ray]'") from None
    return ray


def _connect(ray: Any, section: Any) -> bool:
    """Join the cluster at `section.address`, or start a local Ray (no dashboard); True when
    this call started Ray (and the host shuts it down). An initialised Ray is used as it is."""
    if ray.is_initialized():
        _check_room(ray, section)
        return False
    quiet = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
    if section.address is not None:
        try:
            ray.init(address=section.address, **quiet)
        except (ConnectionError, RuntimeError) as exc:
            raise FedtuneError(f"federation.ray.address {section.address!r}: cannot join that Ray "
                               f"cluster: {exc}") from None
    else:
        ray.init(num_cpus=os.cpu_count() or 1, **quiet)
    try:
        _check_room(ray, section)
    except FedtuneError:
        ray.shutdown()
        raise
    return True


def _check_room(ray: Any, section: Any) -> None:
    """Refuse a recipe whose actors would wait forever for CPUs or GPUs the cluster lacks."""
    have = ray.cluster_resources()
    for what, each in (("CPU", section.cpus_per_actor), ("GPU", section.gpus_per_actor)):
        need = section.num_actors * each
        if need > have.get(what, 0.0) + 1e-9 and each > 0:
            raise FedtuneError(
                f"federation.ray: {section.num_actors} actors x {each:g} {what} = {need:g} {what}s, but "
                f"the Ray cluster has {have.get(what, 0.0):g}; lower ray.num_actors or "
                f"ray.{what.lower()}s_per_actor")
