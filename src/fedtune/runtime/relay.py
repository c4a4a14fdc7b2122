"""Rank 0 of a multi-process party hands each message it receives to the other ranks, which
handle it identically (and train with it); only rank 0's reply goes out.

What travels between the ranks is the codec's own bytes (a length, then a uint8 tensor), never
pickle. The relay uses its own gloo group with a long timeout: the other ranks wait there while
rank 0 waits for the server or evaluates, which can take longer than a collective's default.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedtune.errors import MessageError
from fedtune.train.distributed import Ranks, ranks

Endpoint = Callable[[bytes], "bytes | None"]
WAIT = datetime.timedelta(days=7)   # how long the other ranks wait for rank 0's next message
_STOP = -1


class Relay:
    """Broadcast of (receiver, message bytes) from rank 0 to the other ranks of a launch."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.group = dist.new_group(backend="gloo", timeout=WAIT)  # CPU tensors, any device
        self.relayed = 0
        self.stopped = False

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0, group=self.group)

    def send(self, receiver: str, data: bytes) -> None:
        """Rank 0: give the other ranks a message for `receiver` (before handling it itself)."""
        name = receiver.encode("utf-8")
        self._broadcast(torch.tensor([len(name), len(data)], dtype=torch.int64))
        payload = torch.frombuffer(bytearray(name + data), dtype=torch.uint8)
        self._broadcast(payload)
        self.relayed += 1

    def stop(self) -> None:
        """Rank 0: the party is done (or failed); the other ranks leave their loop. Once only."""
        if self.stopped:
            return
        self.stopped = True
        self._broadcast(torch.tensor([_STOP, 0], dtype=torch.int64))

    def receive(self) -> tuple[str, bytes] | None:
        """The other ranks: the next (receiver, bytes), or None when rank 0 stopped."""
        sizes = torch.zeros(2, dtype=torch.int64)
        self._broadcast(sizes)
        n_name, n_data = (int(v) for v in sizes)
        if n_name == _STOP:
            return None
        if not (0 < n_name <= 4096 and n_data >= 0):
            raise MessageError(f"relay: bad sizes from rank 0 ({n_name}, {n_data})")
        payload = torch.empty(n_name + n_data, dtype=torch.uint8)
        self._broadcast(payload)
        raw = payload.numpy().tobytes()
        return raw[:n_name].decode("utf-8"), raw[n_name:]

    def relaying(self, endpoints: Mapping[str, Endpoint]) -> dict[str, Endpoint]:
        """Rank 0: the same endpoints, each first relaying what it is given."""
        def relayed(name: str, endpoint: Endpoint) -> Endpoint:
            def handle(data: bytes) -> bytes | None:
                self.send(name, data)
                return endpoint(data)
            return handle
        return {name: relayed(name, endpoint) for name, endpoint in endpoints.items()}

    def serve(self, endpoints: Mapping[str, Endpoint]) -> int:
        """The other ranks: handle every relayed message like rank 0 (the reply is rank 0's to
        send, so it is dropped here) until rank 0 stops; returns how many were handled."""
        handled = 0
        while (item := self.receive()) is not None:
            name, data = item
            if name not in endpoints:
                raise MessageError(f"relay: rank 0 sent a message for unknown client {name!r}")
            endpoints[name](data)
            handled += 1
        return handled


# The server's evaluation of a global adapter, relayed under FSDP (every rank runs each forward
# pass of a sharded model): receivers no client can be named (a NUL byte), one per `generate`.
_EVALUATE = {False: "\x00evaluate", True: "\x00evaluate+generate"}
Evaluate = Callable[[dict[str, torch.Tensor], bool, "int | None"], dict]


def relayed_evaluation(relay: Relay, evaluate: Evaluate) -> Evaluate:
    """Rank 0: the server's evaluation, first handing the adapter to the other ranks (as
    safetensors bytes), which evaluate with it in step (`evaluation_endpoints`)."""
    def run(state: dict[str, torch.Tensor], generate: bool, round_: int | None = None) -> dict:
        relay.send(_EVALUATE[bool(generate)], save_tensors(dict(state)))
        return evaluate(state, generate, round_)
    return run


def evaluation_endpoints(evaluate: Evaluate) -> dict[str, Endpoint]:
    """The other ranks: run the relayed evaluation like rank 0 (its figures and predictions are
    rank 0's to keep: this rank writes nothing and replies nothing)."""
    def endpoint(generate: bool) -> Endpoint:
        def handle(data: bytes) -> None:
            try:
                state = load_tensors(data)
            except Exception as exc:  # safetensors raises several types for damaged bytes
                raise MessageError(f"relay: rank 0 sent an unreadable adapter ({exc})") from None
            evaluate(state, generate, None)
            return None
        return handle
    return {name: endpoint(generate) for generate, name in _EVALUATE.items()}


def party_relay() -> Relay | None:
    """The relay of this launch (made on every rank at the same point), or None for one process."""
    launch = ranks()
    return None if launch is None else Relay(launch)
