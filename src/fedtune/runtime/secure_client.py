"""A client's side of secure-aggregation rounds (runtime/secure_round.py): train, then mask the update.

One SecAggClient per round (fresh keys each round); a new SECAGG_FIT discards any round left
unfinished. Every field the server sends is checked (MessageError) before use; the update
itself never leaves the client in the clear. A deployed client whose recipe enables secure
aggregation (``require``) refuses a plain FIT, so a server cannot silently switch it off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedtune.config import SecureAggregationSection
from fedtune.errors import MessageError, RecipeError
from fedtune.privacy import secagg_wire as wire
from fedtune.privacy.fixedpoint import FixedPointCodec, codec_of
from fedtune.privacy.secagg import SecAggClient, SecAggError
from fedtune.runtime import peer_values
from fedtune.runtime.secure_round import LOSS_KEY, PARAM_KEYS, PARAMS_KEY, PLAIN_METRICS, WEIGHTINGS
from fedtune.transport.codec import check_message
from fedtune.wire import SECAGG_ANSWERS, Message, MessageKind

if TYPE_CHECKING:
    from fedtune.runtime.client import Client

MAX_SESSION_CHARS = 128


@dataclass(frozen=True)
class RoundParams:
    peers: list[str]
    threshold: int
    session: str
    codec: FixedPointCodec
    weighting: str


def parse_round_params(value: Any, name: str,
                       expected: SecureAggregationSection | None = None) -> RoundParams:
    """The server's round parameters, checked; against the client's own recipe when it has one."""
    what = "secagg round parameters"
    if not isinstance(value, dict) or set(value) != set(PARAM_KEYS):
        raise MessageError(f"{what}: expected exactly the keys {sorted(PARAM_KEYS)}")
    peers = wire.parse_names(value["peers"], f"{what} peers")
    if name not in peers:
        raise MessageError(f"{what}: this client ({name!r}) is not among the peers")
    session = value["session"]
    if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_CHARS \
            or not session.isprintable():
        raise MessageError(f"{what}: session must be 1..{MAX_SESSION_CHARS} printable characters")
    if value["weighting"] not in WEIGHTINGS:
        raise MessageError(f"{what}: weighting must be one of {list(WEIGHTINGS)}")
    threshold = value["threshold"]
    clip, max_weight = (peer_values.finite_number(value[key], f"{what}: {key}", low=0.0)
                        for key in ("clip", "max_weight"))
    try:
        wire.check_threshold(threshold, len(peers))
        codec = FixedPointCodec(frac_bits=value["frac_bits"], clip=clip, max_weight=max_weight)
        codec.check_capacity(len(peers))
    except RecipeError as exc:
        raise MessageError(f"{what}: {exc}") from None
    if expected is not None:
        own = codec_of(expected)
        if codec != own:
            raise MessageError(f"{what}: the fixed-point code {codec} differs from this client's "
                               f"recipe ({own})")
        if threshold < expected.threshold_for(len(peers)):
            raise MessageError(f"{what}: threshold {threshold} is below this client's recipe "
                               f"({expected.threshold_for(len(peers))} of {len(peers)})")
    return RoundParams(peers, threshold, session, codec, value["weighting"])


@dataclass
class _Pending:
    round: int
    agg: SecAggClient
    weight: float
    x: dict[str, torch.Tensor] | None  # the update (and loss) until it is masked


class SecAggParticipant:
    """Answers a client's secure-aggregation messages; the Client hands them over (one hook)."""

    def __init__(self, name: str):
        self.name = name
        self.expected: SecureAggregationSection | None = None
        self._pending: _Pending | None = None

    def require(self, section: SecureAggregationSection) -> None:
        """Refuse plain FIT and parameters weaker than `section` (a deployed client's recipe)."""
        self.expected = section if section.enabled else None

    def wants(self, msg: Message) -> bool:
        """Whether this message is for secure aggregation (or a plain FIT this client refuses)."""
        return msg.kind in SECAGG_ANSWERS or (self.expected is not None and msg.kind == MessageKind.FIT)

    def handle(self, client: Client, msg: Message) -> Message:
        check_message(msg, kinds={*SECAGG_ANSWERS, MessageKind.FIT}, sender=client.server)
        if msg.kind == MessageKind.FIT:
            raise MessageError("this client's recipe enables secure aggregation; it does not send "
                               "its update in the clear (plain FIT refused)")
        if msg.kind == MessageKind.SECAGG_FIT:
            return self._fit(client, msg)
        pending = self._pending
        if pending is None or pending.round != msg.round:
            raise MessageError(f"no secure-aggregation round {msg.round} in progress here")
        if msg.tensors:
            raise MessageError(f"a {msg.kind.value} message carries no tensors")
        try:
            return self._step(client, pending, msg)
        except SecAggError:
            self._pending = None  # this round cannot go on here
            raise

    def _step(self, client: Client, pending: _Pending, msg: Message) -> Message:
        meta = msg.meta
        if msg.kind == MessageKind.SECAGG_KEYS:
            _exact(meta, ("public_keys",), msg.kind)
            sealed = pending.agg.share_keys(meta["public_keys"])
            return self._reply(client, msg, meta={"shares": sealed})
        if msg.kind == MessageKind.SECAGG_ROUTED:
            _exact(meta, ("shares",), msg.kind)
            assert pending.x is not None  # kept until this step
            masked = pending.agg.masked_input(pending.x, pending.weight, shares=meta["shares"])
            pending.x = None
            return self._reply(client, msg, tensors=masked)
        _exact(meta, ("survivors", "dropped"), msg.kind)
        survivors, dropped = wire.parse_unmask_request(meta, "secagg unmask request")
        reply = pending.agg.unmask_reply(survivors, dropped)
        self._pending = None
        return self._reply(client, msg, meta=reply)

    def _fit(self, client: Client, msg: Message) -> Message:
        self._pending = None  # a new round: whatever was left of an earlier one is discarded
        params = parse_round_params(msg.meta.get(PARAMS_KEY), self.name, self.expected)
        plain = client.fit(msg)  # local training; this plain reply is never sent
        wire_tensors, extra = client.up.split(plain.tensors)
        if extra:
            raise SecAggError(f"the algorithm sends tensors besides the adapter update "
                              f"({sorted(extra)[:3]}); secure aggregation sums only the update")
        metrics = plain.meta.get("metrics", {})
        loss = metrics.get("train_loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise SecAggError(f"local training gave no finite train loss ({loss!r})")
        update = client.up.unpack(wire_tensors, finite_checked=False)  # local, never decoded
        x = {**update, LOSS_KEY: torch.tensor([float(loss)], dtype=torch.float64)}
        weight = float(plain.meta["n_examples"]) if params.weighting == "examples" else 1.0
        try:
            params.codec.check_weight(weight)
        except ValueError as exc:
            raise SecAggError(f"secagg client {self.name!r}: {exc}; raise max_weight") from None
        agg = SecAggClient(self.name, params.peers, params.threshold, params.codec, params.session)
        self._pending = _Pending(msg.round, agg, weight, x)
        shown = {k: float(metrics[k]) for k in PLAIN_METRICS
                 if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
        return self._reply(client, msg, meta={"advert": agg.advertise_keys(), "metrics": shown})

    def _reply(self, client: Client, msg: Message, *, meta: dict[str, Any] | None = None,
               tensors: dict[str, torch.Tensor] | None = None) -> Message:
        return Message(SECAGG_ANSWERS[msg.kind], msg.round, self.name, client.server,
                       tensors=tensors or {}, meta=meta or {})


def _exact(meta: dict[str, Any], keys: tuple[str, ...], kind: MessageKind) -> None:
    if set(meta) != set(keys):
        raise MessageError(f"a {kind.value} message's meta must have exactly the keys {sorted(keys)}")
