"""What each client exchanges with the server: the global adapter, or with
adapter.rank_per_client its own rank's part of it (models/rank_plan.py), both ways.

The server asks this for the tensors it sends a client and for the wire (names, shapes, dtypes,
codec) that client's reply must match: a client of rank r_k is sent, and may only answer with,
LoRA factors of rank r_k; a reply of any other shape is refused like any malformed one.
"""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.base import State
from fedtune.models.rank_plan import client_ranks, truncate
from fedtune.transport.adapter_wire import AdapterWire
from fedtune.transport.codec import specs_of
from fedtune.transport.compression import CompressionConfig
from fedtune.wire import DOWN_ONLY


class ClientShapes:
    def __init__(self, recipe: Any, global_state: State, up: CompressionConfig, down: CompressionConfig):
        spec = recipe.adapter.rank_per_client
        self.ranks: dict[str, int] | None = None
        if spec is not None:
            self.ranks = client_ranks(spec, recipe.federation.clients, recipe.seed)
        self._codecs = (up, down)
        self._wires: dict[int | None, tuple[AdapterWire, AdapterWire]] = {}
        self._full = specs_of(global_state)
        self._packed: tuple[State, dict[int | None, State]] | None = None
        self._base = global_state

    @property
    def mixed(self) -> bool:
        return self.ranks is not None

    def rank(self, client: str) -> int | None:
        """The client's LoRA rank; None for every client without rank_per_client."""
        return None if self.ranks is None else self.ranks.get(client)

    def _pair(self, rank: int | None) -> tuple[AdapterWire, AdapterWire]:
        if rank not in self._wires:
            specs = self._full if rank is None else specs_of(truncate(self._base, rank))
            up = {k: v for k, v in specs.items() if not k.startswith(DOWN_ONLY)}   # sent only
            self._wires[rank] = (AdapterWire(self._codecs[0], up), AdapterWire(self._codecs[1], specs))
        return self._wires[rank]

    def up(self, client: str) -> AdapterWire:
        """The wire a client's update must match (its own rank's shapes)."""
        return self._pair(self.rank(client))[0]

    def down_wire(self, client: str) -> AdapterWire:
        return self._pair(self.rank(client))[1]

    def down(self, client: str, global_state: State) -> State:
        """The packed global adapter for `client` (cut to its rank), packed once per rank."""
        rank = self.rank(client)
        if self._packed is None or self._packed[0] is not global_state:
            self._packed = (global_state, {})
        cache = self._packed[1]
        if rank not in cache:
            part = global_state if rank is None else truncate(global_state, rank)
            cache[rank] = self._pair(rank)[1].pack(part)
        return cache[rank]
