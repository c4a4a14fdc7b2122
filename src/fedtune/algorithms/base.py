"""What every federated algorithm provides: a config, a strategy object, pure aggregation math."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What a client sent back after local training: `tensors` are its update (local - global)."""

    client: str
    tensors: State
    n_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(Protocol):
    """Server-side logic of an algorithm. Holds only its own state (e.g. server optimizer moments)."""

    def configure_fit(self, round_: int, clients: list[str], lr: float) -> dict[str, dict[str, Any]]:
        """Per-client instructions (message meta) for a round's local training."""
        ...

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        """The new global state from the clients' updates."""
        ...

    def state_dict(self) -> State:
        """Tensors to checkpoint so a resumed run continues exactly."""
        ...

    def load_state_dict(self, state: State) -> None: ...


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    summary: str
    config: type[BaseModel]
    build: Callable[[BaseModel], Strategy]


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"algorithm {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registry() -> dict[str, AlgorithmSpec]:
    return dict(_REGISTRY)
