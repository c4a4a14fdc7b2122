"""Admission of gRPC calls before they take a worker, and summarised refusal logs.

gRPC's Python server asks its generic handler for a method handler on its polling thread, before
the call takes one of the bounded worker slots (`maximum_concurrent_rpcs`). The gate checks the
caller's token there (constant time, no I/O): a call with a right token gets its handler; a wrong
one gets a cheap refusal handler (UNAUTHENTICATED, logged with its address) while the refusal
budget allows, otherwise it is shed at once without a worker (gRPC answers UNIMPLEMENTED). So a
flood of strangers never fills the slots that the parties' calls need.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

log = logging.getLogger("fedtune.transport")

SHED = "(not known: shed before a worker)"
_SHOWN_REASONS = 3


class TokenBucket:
    """At most `rate` events per second on average, `burst` at once (thread-safe)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._at = burst, clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


@dataclass
class _Address:
    since: float
    counts: Counter[str] = field(default_factory=Counter)
    logged: bool = False


class RefusalLog:
    """Refused calls by address: the first from an address is logged at once, then one summary
    line per address and interval with the counts by reason; `limited(address)` says an address
    went over `per_address` refusals in its current interval (its next calls are refused unread)."""

    def __init__(self, interval: float = 10.0, per_address: int = 100,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.per_address, self.clock = interval, per_address, clock
        self.total = 0
        self._addresses: dict[str, _Address] = {}
        self._lock = threading.Lock()

    def refused(self, address: str, reason: str) -> None:
        lines: list[str] = []
        with self._lock:
            self.total += 1
            now = self.clock()
            entry = self._addresses.get(address)
            if entry is not None and now - entry.since >= self.interval:
                summary = self._summary(address, entry, now)
                lines += summary  # a new interval: summarised too, unless the address was quiet
                entry = self._addresses[address] = _Address(since=now, logged=bool(summary))
            if entry is None:
                entry = self._addresses[address] = _Address(since=now)
                if len(self._addresses) > 4096:  # forget the quietest addresses, bounded memory
                    self._drop_old(now)
            entry.counts[reason] += 1
            if not entry.logged:
                entry.logged = True
                lines.append(f"refused a call from {address}: {reason} (further refusals from this "
                             f"address are summarised every {self.interval:g} s)")
                entry.counts.clear()
        for line in lines:
            log.warning("%s", line)

    def limited(self, address: str) -> bool:
        with self._lock:
            entry = self._addresses.get(address)
            return (entry is not None and self.clock() - entry.since < self.interval
                    and sum(entry.counts.values()) >= self.per_address)

    def flush(self) -> None:
        """Log what is still unsummarised (at shutdown)."""
        with self._lock:
            now = self.clock()
            lines = [line for address, entry in self._addresses.items()
                     for line in self._summary(address, entry, now)]
            self._addresses.clear()
        for line in lines:
            log.warning("%s", line)

    def _summary(self, address: str, entry: _Address, now: float) -> list[str]:
        n = sum(entry.counts.values())
        if not n:
            return []
        top = entry.counts.most_common(_SHOWN_REASONS)
        shown = "; ".join(f"{count} x {reason}" for reason, count in top)
        rest = n - sum(count for _, count in top)
        more = f"; {rest} others" if rest else ""
        return [f"refused {n} calls from {address} in {now - entry.since:.0f} s: {shown}{more}"]

    def _drop_old(self, now: float) -> None:
        for address, entry in sorted(self._addresses.items(), key=lambda kv: kv[1].since)[:1024]:
            for line in self._summary(address, entry, now):
                log.warning("%s", line)
            del self._addresses[address]


def peer_address(peer: str) -> str:
    """`ipv4:1.2.3.4:5678` / `ipv6:[::1]:5678` -> the host part (one entry per host, not per port)."""
    text = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return text.rsplit(":", 1)[0] if ":" in text else text


class Gate(grpc.GenericRpcHandler):
    """The server's generic handler: admits calls whose token is right, refuses the others cheaply.

    `check(metadata)` returns the claimed identity or raises with the reason (the Authenticator's
    token check); `handlers` maps a full method name to (its handler, a refusal handler factory).
    """

    def __init__(self, check: Callable[[tuple], str],
                 handlers: dict[str, tuple[grpc.RpcMethodHandler, Callable[[str], grpc.RpcMethodHandler]]],
                 refusals: RefusalLog, budget: TokenBucket, on_shed: Callable[[], None]):
        self.check, self.handlers, self.refusals, self.budget = check, handlers, refusals, budget
        self.on_shed = on_shed

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        entry = self.handlers.get(handler_call_details.method)
        if entry is None:
            return None
        handler, refusal = entry
        try:
            self.check(tuple(handler_call_details.invocation_metadata or ()))
        except Exception as exc:  # noqa: BLE001 - any failure of the check refuses the call
            if self.budget.take():
                return refusal(f"{handler_call_details.method.rsplit('/', 1)[-1]}: {exc}")
            self.on_shed()
            self.refusals.refused(SHED, "over the refusal budget")
            return None  # gRPC answers UNIMPLEMENTED at once; no worker is taken
        return handler
