"""What one round's exchange with the clients produced, as a value: Server.run_round alone applies
it to the server's state and logs it, whichever exchange ran (plain or secure aggregation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtune.algorithms.base import ClientUpdate, State
from fedtune.track.reporter import Reporter
from fedtune.transport.base import ServerTransport


@dataclass
class RoundIO:
    """What an exchange talks through: the transport, the progress display, the reply timeout."""

    transport: ServerTransport
    reporter: Reporter
    reply_timeout: float | None
    rounds: int   # federation.rounds, for the progress display


@dataclass
class Rejection:
    """A reply refused during the exchange (counted and logged by the server)."""

    client: str
    what: str      # "reply", "secagg_advert", ...
    reason: str


@dataclass
class RoundOutcome:
    """One round's exchange: what to aggregate, who is in it, who is not and why, what to log.

    A plain round hands over each client's valid `updates` (or, streamed, their `fold` with the
    updates' figures only); a secure one (`secure`) only `mean`, the weighted mean of the
    survivors' updates (None when the round stopped before unmasking).
    """

    secure: bool = False
    updates: list[ClientUpdate] = field(default_factory=list)
    mean: State | None = None
    counted: list[str] = field(default_factory=list)               # clients in the aggregate
    left: dict[str, str] = field(default_factory=dict)             # the others: why (no_update)
    fit_logs: dict[str, dict[str, Any]] = field(default_factory=dict)   # counted client -> fit event
    rejected: list[Rejection] = field(default_factory=list)
    train_loss: float | None = None                                 # their weighted mean loss
    info: dict[str, Any] = field(default_factory=dict)              # extra round-summary figures
    fold: Any = None   # streaming aggregation (algorithms/folding.py): `updates` hold no tensors
