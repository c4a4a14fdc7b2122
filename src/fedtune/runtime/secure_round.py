"""One federated round under secure aggregation, server side: the server learns only the sum.

The round is four exchanges of the ordinary transport (simulation or gRPC; every message is
counted in the round's bytes), driving fedtune.privacy.secagg (Bonawitz et al.; its module
docstring states the protocol, threat model and limits):

    SECAGG_FIT    (global adapter, round parameters) -> SECAGG_ADVERT  (public keys; the client trains first)
    SECAGG_KEYS   (all public keys)                  -> SECAGG_SHARES  (sealed Shamir shares, one per peer)
    SECAGG_ROUTED (shares sealed for this client)    -> SECAGG_MASKED  (masked enc(w·Δ), w, w·loss: int64)
    SECAGG_UNMASK (survivors, dropped)               -> SECAGG_REVEAL  (shares that remove the masks)

The unmasked result is Σ w_i Δ_i and Σ w_i over the clients whose masked input arrived; their
mean goes back to Server.run_round (runtime/round.py: RoundOutcome), which hands it to the strategy
as ONE ClientUpdate (so FedAvg adds it, a FedOpt rule takes it as its pseudo-gradient). Only algorithms registered with ``sum_only`` are allowed (config checks).

A client that does not answer a step, or answers with something invalid, has dropped; the round
goes on while at least ``threshold`` clients remain at each step. Below it, or below
transport.min_replies masked inputs, the round stops before anything is revealed and the global
adapter stays unchanged (a warning, as in the plain round). Clients receive fresh keys each round.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.algorithms import algorithm_options
from fedtune.algorithms.base import State
from fedtune.config import Recipe, SecureAggregationSection
from fedtune.errors import MessageError
from fedtune.privacy import secagg_wire as wire
from fedtune.privacy.fixedpoint import FixedPointCodec, codec_of
from fedtune.privacy.secagg_server import SecAggResult, SecAggServer
from fedtune.privacy.secagg_wire import SecAggError
from fedtune.runtime import peer_values
from fedtune.runtime.round import Rejection, RoundIO, RoundOutcome
from fedtune.transport.codec import check_message
from fedtune.wire import Message, MessageKind, TensorSpec

log = logging.getLogger("fedtune.server")

PARAMS_KEY = "secagg"  # in the SECAGG_FIT meta, beside the strategy's instructions
LOSS_KEY = "secagg.train_loss"  # w·loss rides in the masked sum: only the weighted mean is revealed
PARAM_KEYS = ("peers", "threshold", "session", "frac_bits", "clip", "max_weight", "weighting")
# What a client reports in the clear: timing (not hidden anyway), its rate, its own DP-SGD budget.
PLAIN_METRICS = ("train_seconds", "lr", "dp_epsilon", "dp_delta")
WEIGHTINGS = ("examples", "uniform")
SYNTHETIC_CLIENT = "secagg-sum"


def round_params(peers: list[str], threshold: int, session: str, codec: FixedPointCodec,
                 weighting: str) -> dict[str, Any]:
    """The round's parameters, sent to every client with its SECAGG_FIT (JSON values)."""
    return {"peers": sorted(peers), "threshold": threshold, "session": session,
            "frac_bits": codec.frac_bits, "clip": float(codec.clip),
            "max_weight": float(codec.max_weight), "weighting": weighting}


@dataclass
class _Round:
    """What one secure round has gathered so far."""

    number: int
    chosen: list[str]
    left: dict[str, str] = field(default_factory=dict)  # client -> why it left the round
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)

    def drop(self, clients: list[str], got: dict[str, Any], step: str) -> list[str]:
        """Mark those of `clients` without a valid answer as dropped; returns the others."""
        for c in clients:
            if c not in got:
                self.left.setdefault(c, step)
        return [c for c in clients if c in got]


class SecureAggregation:
    """Runs Server rounds under secure aggregation (``federation.secure_aggregation``)."""

    def __init__(self, section: SecureAggregationSection, specs: dict[str, TensorSpec],
                 weighting: str, min_replies: int):
        self.section = section
        self.codec = codec_of(section)
        self.shapes = {name: tuple(spec.shape) for name, spec in specs.items()}
        self.shapes[LOSS_KEY] = (1,)
        self.weighting = weighting
        self.min_replies = min_replies

    @classmethod
    def from_recipe(cls, recipe: Recipe, specs: dict[str, TensorSpec]) -> SecureAggregation | None:
        fed = recipe.federation
        if not fed.secure_aggregation.enabled:
            return None
        options = algorithm_options(fed.algorithm, fed.options)
        # federation.weighting: uniform overrides the algorithm's own option (trust no claim)
        weighting = "uniform" if fed.weighting == "uniform" else getattr(options, "weighting", "examples")
        return cls(fed.secure_aggregation, specs, weighting, recipe.transport.min_replies)

    # -- one round --------------------------------------------------------------------------------

    def exchange(self, io: RoundIO, round_: int, chosen: list[str], tensors: State,
                 instructions: dict[str, dict[str, Any]],
                 max_examples: Callable[[str], int]) -> RoundOutcome:
        """The round's exchange under secure aggregation: `tensors` (the global adapter and the
        strategy's extra tensors) go out with each client's SECAGG_FIT; what comes back is the
        survivors' weighted mean update (or None), never an individual update."""
        state = _Round(round_, list(chosen))
        threshold = self.section.threshold_for(len(chosen))
        session = f"round-{round_}-{secrets.token_hex(16)}"
        params = round_params(chosen, threshold, session, self.codec, self.weighting)
        result: SecAggResult | None = None
        try:
            agg = SecAggServer(chosen, threshold, self.shapes, self.codec, session)
            result = self._protocol(io, state, agg, params, tensors, instructions)
            if result is not None:
                self._check_weight(result, max_examples)
        except (SecAggError, MessageError) as exc:
            result = None
            log.warning("round %d: secure aggregation stopped (%s); the global adapter is unchanged",
                        round_, exc)
        return self._outcome(state, result, threshold)

    def _protocol(self, io: RoundIO, state: _Round, agg: SecAggServer, params: dict[str, Any],
                  tensors: State, instructions: dict[str, dict[str, Any]]) -> SecAggResult | None:
        round_ = state.number
        fits = {c: Message(MessageKind.SECAGG_FIT, round_, "server", c, tensors=tensors,
                           meta={**instructions[c], PARAMS_KEY: params}) for c in state.chosen}
        adverts = self._step(io, state, "advert", fits, MessageKind.SECAGG_ADVERT,
                             lambda c, m: self._advert(state, c, m))
        broadcast = agg.collect_keys(adverts)

        keys = {c: self._request(MessageKind.SECAGG_KEYS, state, c, {"public_keys": broadcast})
                for c in adverts}
        shares = self._step(io, state, "shares", keys, MessageKind.SECAGG_SHARES,
                            lambda c, m: _shares(set(adverts) - {c}, c, m))
        routed = agg.route_shares(shares)

        routes = {c: self._request(MessageKind.SECAGG_ROUTED, state, c, {"shares": routed[c]})
                  for c in routed}
        io.transport.expect(round_, MessageKind.SECAGG_MASKED, list(routes),  # refused early if not
                                {n: TensorSpec(tuple(shape), torch.int64) for n, shape in agg.layout})
        masked = self._step(io, state, "masked", routes, MessageKind.SECAGG_MASKED,
                            lambda c, m: _masked(agg, c, m))
        if len(masked) < min(self.min_replies, len(state.chosen)):
            log.warning("round %d: %d masked input(s), fewer than transport.min_replies=%d; nothing "
                        "is unmasked and the global adapter is unchanged",
                        round_, len(masked), self.min_replies)
            return None
        request = agg.unmask_request(masked)

        unmask = {c: self._request(MessageKind.SECAGG_UNMASK, state, c, request)
                  for c in request["survivors"]}
        index = {p: i + 1 for i, p in enumerate(sorted(state.chosen))}
        reveals = self._step(io, state, "reveal", unmask, MessageKind.SECAGG_REVEAL,
                             lambda c, m: _reveal(request, index[c], c, m))
        began = time.perf_counter()
        result = agg.aggregate(reveals)
        state.seconds["aggregate"] = time.perf_counter() - began
        if result.total_weight <= 0:
            raise SecAggError(f"the revealed total weight is {result.total_weight}, not positive")
        return result

    @staticmethod
    def _request(kind: MessageKind, state: _Round, client: str, meta: dict[str, Any]) -> Message:
        return Message(kind, state.number, "server", client, meta=meta)

    def _step(self, io: RoundIO, state: _Round, step: str, requests: dict[str, Message],
              answer: MessageKind, parse: Callable[[str, Message], Any]) -> dict[str, Any]:
        """Send one request per client, collect, keep the valid answers (parsed) by client."""
        began = time.perf_counter()
        round_ = state.number
        if step != "advert":  # the clients bar restarts for each step
            io.reporter.round_begin(round_, io.rounds, len(requests))
        io.reporter.status(f"secure aggregation: {step}")
        for msg in requests.values():
            io.transport.send(msg)
        replies = io.transport.collect(round_, list(requests), timeout=io.reply_timeout)
        got: dict[str, Any] = {}
        for msg in replies:
            try:
                if msg.kind == MessageKind.ERROR:
                    raise MessageError(f"client reported: {str(msg.meta.get('error', '?'))[:300]}")
                check_message(msg, kinds={answer}, round=round_)
                if msg.sender not in requests or msg.sender in got:
                    raise MessageError("not asked at this step, or answered twice")
                got[msg.sender] = parse(msg.sender, msg)
            except MessageError as exc:
                state.rejected.append(Rejection(msg.sender, answer.value, str(exc)))
        state.drop(list(requests), got, f"no valid answer at the {step} step")
        state.seconds[step] = time.perf_counter() - began
        return {c: got[c] for c in requests if c in got}

    def _advert(self, state: _Round, client: str, msg: Message) -> dict[str, str]:
        meta = msg.meta
        _exact(meta, ("advert", "metrics"), "secagg advert")
        what = f"secagg advert of {client!r}"
        wire.parse_advert(meta["advert"], what)
        metrics = meta["metrics"]
        if not isinstance(metrics, dict) or set(metrics) - set(PLAIN_METRICS):
            raise MessageError(f"{what}: metrics may hold only {list(PLAIN_METRICS)}")
        state.metrics[client] = {
            key: peer_values.finite_number(value, f"{what}: metrics.{key}", low=0.0,
                                           high=1.0 if key == "dp_delta" else None)
            for key, value in metrics.items()}
        return meta["advert"]

    # -- the result -------------------------------------------------------------------------------

    def _check_weight(self, result: SecAggResult, max_examples: Callable[[str], int]) -> None:
        """The revealed total weight must be what the survivors may claim together: their number
        under uniform weighting, at most the sum of their bounds (Server.max_examples) otherwise.
        A larger total means a client lied about its weight; the round is dropped."""
        survivors = list(result.survivors)
        total = result.total_weight
        if self.weighting == "uniform":
            if abs(total - len(survivors)) > 0.5:
                raise SecAggError(f"the revealed total weight {total:.3f} is not the number of "
                                  f"survivors ({len(survivors)}) under uniform weighting")
            return
        bound = sum(max_examples(c) for c in survivors)
        if not total <= bound + 0.5:
            raise SecAggError(f"the revealed total weight {total:.3f} is above what the "
                              f"{len(survivors)} survivors may claim together ({bound})")

    def _mean(self, result: SecAggResult) -> State:
        """Σ w_i Δ_i / Σ w_i for the adapter tensors."""
        total = result.total_weight
        return {name: t / total for name, t in result.weighted_sum.items() if name != LOSS_KEY}

    def _outcome(self, state: _Round, result: SecAggResult | None, threshold: int) -> RoundOutcome:
        """The round as a value: the survivors' mean update and loss, who left and why."""
        counted = list(result.survivors) if result is not None else []
        left = {c: f"secure aggregation: not in the sum "
                   f"({state.left.get(c, 'the round stopped before unmasking')})"
                for c in state.chosen if c not in counted}
        mean, loss = None, None
        if result is not None:
            mean = self._mean(result)
            loss = float(result.weighted_sum[LOSS_KEY][0]) / result.total_weight
        info = {"secagg": {"threshold": threshold, "survivors": len(counted),
                           "dropped": sorted(set(state.chosen) - set(counted)),
                           "seconds": {k: round(v, 4) for k, v in state.seconds.items()}}}
        return RoundOutcome(secure=True, mean=mean, counted=counted, left=left,
                            fit_logs={c: dict(state.metrics.get(c, {})) for c in counted},
                            rejected=state.rejected, train_loss=loss, info=info)


def _exact(meta: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    if set(meta) != set(keys):
        raise MessageError(f"{what}: meta keys must be exactly {sorted(keys)}")


def _shares(others: set[str], client: str, msg: Message) -> dict[str, str]:
    _exact(msg.meta, ("shares",), "secagg shares")
    if msg.tensors:
        raise MessageError("secagg shares carry no tensors")
    wire.parse_sealed_shares(msg.meta["shares"], others, f"secagg shares of {client!r}", exact=True)
    return msg.meta["shares"]


def _masked(agg: SecAggServer, client: str, msg: Message) -> dict[str, torch.Tensor]:
    if msg.meta:
        raise MessageError("a secagg masked input carries no meta")
    wire.parse_masked_input(msg.tensors, agg.layout, f"secagg masked input of {client!r}")
    return msg.tensors


def _reveal(request: dict[str, list[str]], index: int, client: str, msg: Message) -> dict[str, Any]:
    if msg.tensors:
        raise MessageError("a secagg unmask reply carries no tensors")
    what = f"secagg unmask reply of {client!r}"
    own, keys = wire.parse_unmask_reply(msg.meta, request["survivors"], request["dropped"], what)
    if any(share.x != index for share in (*own.values(), *keys.values())):
        raise MessageError(f"{what}: a share is not {client!r}'s own")
    return msg.meta
