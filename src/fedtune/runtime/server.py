"""The federated server: samples clients, sends the global adapter, aggregates, evaluates, checkpoints.

It talks to clients only through a ServerTransport, so the same code runs a simulation (in-process
transport) and a deployment (network transport).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedtune.algorithms.base import ClientUpdate, State, Strategy
from fedtune.algorithms.folding import Fold
from fedtune.algorithms.party import Party, StandardParty
from fedtune.config import Recipe
from fedtune.errors import MessageError
from fedtune.eval.selection import Selection, pooled_val_loss
from fedtune.runtime import peer_values
from fedtune.runtime.client_shapes import ClientShapes
from fedtune.runtime.round import Rejection, RoundIO, RoundOutcome
from fedtune.runtime.secure_round import SYNTHETIC_CLIENT, SecureAggregation
from fedtune.seeding import derive_seed
from fedtune.track.reporter import NullReporter, Reporter
from fedtune.track.rundir import Checkpoint, RunDir
from fedtune.train.local import lr_for_round
from fedtune.transport.adapter_wire import AdapterWire
from fedtune.transport.base import ServerTransport
from fedtune.transport.codec import check_message, specs_of
from fedtune.transport.compression import codec_of
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.server")
PARTY = "party/"  # the algorithm's server-side party state rides in the checkpoint's strategy file
SERVER = "server"


def sample_clients(clients: list[str], k: int, seed: int, round_: int) -> list[str]:
    """The `k` clients taking part in a round: a seeded choice, returned in registration order."""
    if k >= len(clients):
        return list(clients)
    rng = np.random.default_rng(derive_seed(seed, "sample", round_))
    chosen = set(rng.choice(len(clients), size=k, replace=False).tolist())
    return [c for i, c in enumerate(clients) if i in chosen]


class ClientStateStore(Protocol):
    """Persistent algorithm state of the clients a process hosts (simulation), for checkpoints."""

    def state_dict(self) -> State: ...
    def load_state_dict(self, state: State) -> None: ...


@dataclass
class Timings:
    """Seconds spent in local training and evaluation (what is not framework overhead)."""

    train: float = 0.0
    eval: float = 0.0
    wall_before: float = 0.0  # wall seconds of earlier sessions of a resumed run

    def state(self) -> dict[str, float]:
        return {"train_seconds": self.train, "eval_seconds": self.eval}


@dataclass
class ServerResult:
    rounds: int
    global_state: State
    initial: dict[str, Any] | None
    final: dict[str, Any]
    clients: dict[str, dict[str, Any]]
    timings: Timings
    rejected: int = 0
    missing: int = 0
    strategy_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    local_dp: dict[str, dict[str, Any]] = field(default_factory=dict)  # DP-SGD (ε, δ) per client
    selection: Selection | None = None  # output.keep_best and eval.early_stopping


class Server:
    def __init__(
        self,
        recipe: Recipe,
        *,
        strategy: Strategy,
        transport: ServerTransport,
        clients: list[str],
        global_state: State,
        run_dir: RunDir,
        evaluate_global: Callable[[State, bool, int], dict[str, Any]] | None = None,
        reporter: Reporter | None = None,
        reply_timeout: float | None = None,
        client_state: ClientStateStore | None = None,
        example_counts: Mapping[str, int] | None = None,
        party: Party | None = None,
        on_eval: Callable[[int, dict[str, Any]], bool] | None = None,
    ):
        """`example_counts`: each client's real number of training examples where the server knows
        it (simulation); a claim above it is refused. Otherwise (deployment) the bound is
        federation.max_examples_per_client. `party`: the algorithm's hooks of this process (its
        work between rounds and the state that needs, checkpointed with the strategy's). `on_eval`:
        called with each evaluation during training (round, metrics); True stops the run there,
        cleanly, as early stopping does (`fedtune tune`'s pruner)."""
        self.recipe = recipe
        self.strategy = strategy
        self.transport = transport
        self.clients = list(clients)
        holdout = set(recipe.federation.holdout_names())  # evaluated, never trained
        self.training = [c for c in self.clients if c not in holdout]
        subset = recipe.eval.client_subset  # the clients each client evaluation visits
        picked = set(self.clients if subset is None else sample_clients(self.training, subset, recipe.seed, 0))
        self.eval_clients = [c for c in self.clients if c in picked or c in holdout]  # unseen: always
        self.global_state = global_state
        self.run_dir = run_dir
        self.evaluate_global = evaluate_global
        self.reporter = reporter or NullReporter()
        self.reply_timeout = reply_timeout
        self.client_state = client_state
        self.example_counts = example_counts if example_counts is not None else {}  # read lazily
        self.party = party or StandardParty()
        self.on_eval = on_eval
        self.claimed: dict[str, int] = {}  # this round's claimed example counts (logged)
        self.specs = specs_of(global_state)
        compression = recipe.federation.compression
        self.up = AdapterWire(codec_of(compression.up), self.specs)
        self.down = AdapterWire(codec_of(compression.down), self.specs)
        # each client's own shapes (adapter.rank_per_client: its rank's part of the adapter)
        self.shapes = ClientShapes(recipe, global_state, codec_of(compression.up), codec_of(compression.down))
        self.secure = SecureAggregation.from_recipe(recipe, self.specs)  # None unless enabled
        self.timings = Timings()
        self.rejected = 0
        self.missing = 0
        self.initial: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] = {}
        self.client_eval: dict[str, dict[str, Any]] = {}
        self.local_dp: dict[str, dict[str, Any]] = {}
        self.selection = Selection(recipe.output.keep_best, recipe.eval.early_stopping)

    # -- resume ---------------------------------------------------------------------------------

    def restore(self, ckpt: Checkpoint) -> int:
        """Continue from a checkpoint; returns the next round to run."""
        # Keep the tensors in the order the model gives them (a checkpoint file lists them sorted by
        # name): anything that walks the state in order, as DP-FedAvg's noise does, must replay it.
        order = [k for k in self.global_state if k in ckpt.global_state]
        self.global_state = {**{k: ckpt.global_state[k] for k in order}, **ckpt.global_state}
        strategy_state = {k: v for k, v in ckpt.strategy_state.items() if not k.startswith(PARTY)}
        self.strategy.load_state_dict(strategy_state)
        self.party.load_state_dict({k.removeprefix(PARTY): v for k, v in ckpt.strategy_state.items()
                                    if k.startswith(PARTY)})
        self.transport.load_counter_state(ckpt.info.get("transport", {}))  # late replies... go on
        self.transport.traffic.load_state(ckpt.info.get("traffic", {}))
        self.timings = Timings(train=peer_values.stored_seconds(ckpt.info.get("train_seconds")),
                               eval=peer_values.stored_seconds(ckpt.info.get("eval_seconds")),
                               wall_before=peer_values.stored_seconds(ckpt.info.get("wall_seconds")))
        initial = ckpt.info.get("initial")
        self.initial = initial if isinstance(initial, dict) else None
        if self.client_state is not None:
            self.client_state.load_state_dict(ckpt.client_state)
        self.rejected = peer_values.stored_count(ckpt.info.get("rejected"))
        self.missing = peer_values.stored_count(ckpt.info.get("missing"))
        last_eval, client_eval = ckpt.info.get("last_eval"), ckpt.info.get("client_eval")
        self.last_eval = last_eval if isinstance(last_eval, dict) else {}
        self.client_eval = client_eval if isinstance(client_eval, dict) else {}
        selection = ckpt.info.get("selection")
        self.selection.load(selection if isinstance(selection, dict) else {}, ckpt.best_state)
        return ckpt.round + 1

    # -- the run --------------------------------------------------------------------------------

    def run(self, start_round: int = 1) -> ServerResult:
        fed = self.recipe.federation
        started = time.perf_counter()
        self._wall = lambda: self.timings.wall_before + time.perf_counter() - started
        if start_round == 1 and self.recipe.eval.at_start:
            self.initial = self.evaluate(0, final=False)
            self.selection.observe(0, self.initial, self.global_state)
        end = self.selection.stopped_at or fed.rounds  # a resumed run that had stopped early
        for round_ in range(start_round, end + 1):
            self.run_round(round_)
            last = round_ == fed.rounds
            every = self.recipe.eval.every
            stop = pruned = False
            if last or (every and round_ % every == 0):
                self.last_eval = self.evaluate(round_, final=last)
                stop = self.selection.observe(round_, self.last_eval, self.global_state) and not last
                pruned = not (stop or last) and self.on_eval is not None and self.on_eval(round_, self.last_eval)
                stop = stop or pruned
            ckpt_every = self.recipe.output.checkpoint_every
            if last or stop or (ckpt_every and round_ % ckpt_every == 0):
                self.checkpoint(round_)
            if stop:
                end = round_
                self.reporter.status(f"round {round_}: stopped by the caller (on_eval)" if pruned else
                                     f"round {round_}: early stopping ({self.recipe.eval.early_stopping.metric} "
                                     f"has not improved for {self.selection.stale} evaluations)")
                break
        self.privacy = self.strategy.round_metrics()
        self.finish(end)
        return ServerResult(
            rounds=end, global_state=self.global_state, initial=self.initial,
            final=self.last_eval, clients=self.client_eval, timings=self.timings,
            rejected=self.rejected, missing=self.missing, strategy_metrics=self.privacy,
            local_dp=self.local_dp, selection=self.selection,
        )

    def run_round(self, round_: int) -> None:
        """One round: the exchange (plain, or secure aggregation) returns what it produced; this
        alone aggregates, runs the algorithm's work between rounds, counts and logs."""
        fed, train = self.recipe.federation, self.recipe.train
        chosen = sample_clients(self.training, fed.per_round(), self.recipe.seed, round_)
        lr = lr_for_round(train, round_, fed.rounds)
        instructions = self.strategy.configure_fit(round_, chosen, lr)
        self.reporter.round_begin(round_, fed.rounds, len(chosen))
        start = time.perf_counter()
        extra = self.strategy.fit_tensors(round_, self.global_state)
        if self.secure is not None:  # the server sees only the sum (runtime/secure_round.py)
            io = RoundIO(self.transport, self.reporter, self.reply_timeout, fed.rounds)
            tensors = {**self.down.pack(self.global_state), **extra}
            outcome = self.secure.exchange(io, round_, chosen, tensors, instructions, self.max_examples)
        else:
            outcome = self._exchange(round_, chosen, extra, instructions)
        for rejection in outcome.rejected:
            self._reject(round_, rejection.client, rejection.what, rejection.reason)
        self._aggregate(round_, outcome)
        self.global_state = self.party.after_round(round_, self.global_state)
        for client, why in outcome.left.items():  # rejected, dropped, or never arrived
            self.missing += 1
            self.run_dir.log(round_, client, "no_update", {"reason": why})
        traffic = self.transport.traffic.by_client(round_)
        for client in outcome.counted:  # metrics were checked (runtime/peer_values.py)
            values = outcome.fit_logs.get(client, {})
            self.timings.train += float(values.get("train_seconds") or 0.0)
            if "dp_epsilon" in values:  # local DP-SGD: the client's (ε, δ) over its rounds
                self.local_dp[client] = {"epsilon": values["dp_epsilon"],
                                         "delta": values.get("dp_delta")}
            self.run_dir.log(round_, client, "fit", {**values, **traffic.get(client, {})})
        summary = {
            "clients": len(chosen), "updates": len(outcome.counted), "lr": lr,
            "train_loss": outcome.train_loss,
            "bytes_up": self.transport.traffic.round_total(round_, "up"),
            "bytes_down": self.transport.traffic.round_total(round_, "down"),
            "seconds": time.perf_counter() - start,
            **outcome.info,
            **self.strategy.round_metrics(),
        }
        self.run_dir.log(round_, None, "round", summary)
        self.reporter.round_end(round_, summary)

    def _exchange(self, round_: int, chosen: list[str], extra: State,
                  instructions: dict[str, dict[str, Any]]) -> RoundOutcome:
        """The plain exchange: FIT to each chosen client (the global adapter in its shapes and the
        strategy's `extra` tensors), each one's valid UPDATE back."""
        for client in chosen:  # anything else is refused early
            self.transport.expect(round_, MessageKind.UPDATE, [client],
                                  {**self.shapes.up(client).wire, **self.strategy.update_specs(self.specs)})
        for client in chosen:
            tensors = {**self.shapes.down(client, self.global_state), **extra}
            self.transport.send(Message(MessageKind.FIT, round_, SERVER, client,
                                        tensors=tensors, meta=instructions[client]))
        rejected: list[Rejection] = []
        folding = getattr(self.strategy, "fold", None)  # streaming aggregation, where it can
        fold = folding(round_, self.global_state) if folding is not None else None
        updates = self._accept_updates(
            round_, chosen, self.transport.collect_each(round_, chosen, timeout=self.reply_timeout),
            rejected, fold)
        accepted = {u.client for u in updates}
        return RoundOutcome(
            updates=updates, counted=[u.client for u in updates],
            left={c: "no valid update this round" for c in chosen if c not in accepted},
            fit_logs={u.client: {**u.metrics, "n_examples": self.claimed.get(u.client, u.n_examples),
                                 "weight": u.n_examples} for u in updates},
            rejected=rejected, train_loss=mean_train_loss(updates), fold=fold)

    def _aggregate(self, round_: int, outcome: RoundOutcome) -> None:
        """The new global state from the round's outcome, where it has enough to aggregate."""
        if outcome.secure:
            if outcome.mean is not None:  # one update holding the survivors' weighted mean
                self.global_state = self.strategy.aggregate_fit(
                    round_, self.global_state, [ClientUpdate(SYNTHETIC_CLIENT, outcome.mean, 1)])
            return  # otherwise the exchange said why nothing was revealed
        updates = outcome.updates
        min_replies = min(self.recipe.transport.min_replies, len(outcome.counted) + len(outcome.left))
        needed = self.strategy.min_updates()
        if updates and len(updates) >= max(min_replies, needed):
            self.global_state = (outcome.fold.finish() if outcome.fold is not None else  # streamed
                                 self.strategy.aggregate_fit(round_, self.global_state, updates))
        elif updates and len(updates) < needed:
            log.warning("round %d: %d valid update(s), fewer than the %d that %s needs; the global "
                        "adapter is unchanged", round_, len(updates), needed, self.recipe.federation.algorithm)
        elif updates:
            log.warning("round %d: %d valid update(s), fewer than transport.min_replies=%d; "
                        "the global adapter is unchanged", round_, len(updates), min_replies)
        else:
            log.warning("round %d: no valid update arrived; the global adapter is unchanged", round_)

    def _accept_updates(self, round_: int, chosen: list[str], replies: Iterable[Message],
                        rejected: list[Rejection], fold: Fold | None = None) -> list[ClientUpdate]:
        """The valid updates of the round's clients, in `chosen` order; every other reply is
        rejected, logged and counted. Each update's weight (ClientUpdate.n_examples) is set here,
        the one place for every strategy: 1 under federation.weighting `uniform`, otherwise the
        client's claim, refused above what the server knows or allows (max_examples). With a
        `fold` (streaming aggregation), each valid update is folded in as it arrives and kept
        without its tensors, so the round holds O(1) updates."""
        updates: dict[str, ClientUpdate] = {}
        self.claimed = {}
        uniform = self.recipe.federation.weighting == "uniform"
        for msg in replies:
            try:
                if msg.kind == MessageKind.ERROR:
                    raise MessageError(f"client reported: {peer_values.error_text(msg.meta.get('error', '?'))}")
                up = self.shapes.up(msg.sender)  # the sender's own shapes
                check_message(msg, kinds={MessageKind.UPDATE}, round=round_,
                              tensor_specs={**up.wire, **self.strategy.update_specs(self.specs)})
                if msg.sender not in chosen or msg.sender in updates:
                    raise MessageError("not asked for an update this round, or answered twice")
                n = peer_values.count(msg.meta.get("n_examples"), "meta.n_examples", low=1,
                                      high=self.max_examples(msg.sender))
                metrics = peer_values.metrics(msg.meta.get("metrics", {}))
                wire, extra = up.split(msg.tensors)
                tensors = {**up.unpack(wire), **extra}
                update = ClientUpdate(msg.sender, tensors, 1 if uniform else n, metrics)
                if fold is not None:
                    fold.add(update)
                    update.tensors = {}
                updates[msg.sender] = update
                self.claimed[msg.sender] = n
            except MessageError as exc:
                rejected.append(Rejection(msg.sender, "reply", str(exc)))
            del msg
        return [updates[c] for c in chosen if c in updates]

    def max_examples(self, client: str) -> int:
        """The most examples `client` may claim: its partition size where the server knows it
        (simulation), otherwise federation.max_examples_per_client."""
        known = self.example_counts.get(client)
        return known if known is not None else self.recipe.federation.max_examples_per_client

    def _reject(self, round_: int, sender: str, what: str, exc: Exception | str) -> None:
        self.rejected += 1
        log.warning("round %d: rejected the %s of %s: %s", round_, what, sender, exc)
        self.run_dir.log(round_, sender, "rejected", {"reason": str(exc)})

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, round_: int, *, final: bool) -> dict[str, Any]:
        """Global test set on the server; each client's test part on that client."""
        start = time.perf_counter()
        self.reporter.status(f"round {round_}: evaluating")
        metrics: dict[str, Any] = {}
        if self.evaluate_global is not None:
            metrics = self.evaluate_global(self.global_state, True, round_)
            self.run_dir.log(round_, None, "eval", {"scope": "global", **metrics})
        if self.recipe.eval.clients:
            reports: dict[str, dict[str, Any]] = {}
            for client in self.eval_clients:
                tensors = self.shapes.down(client, self.global_state)
                self.transport.send(Message(MessageKind.EVALUATE, round_, SERVER, client,
                                            tensors=tensors, meta={"generate": final or self.selection.may_stop()}))
            answered: set[str] = set()
            for msg in self.transport.collect(round_, self.eval_clients, timeout=self.reply_timeout):
                try:
                    check_message(msg, kinds={MessageKind.EVAL_RESULT}, round=round_)
                    if msg.sender not in self.eval_clients or msg.sender in answered:
                        raise MessageError("not asked for an evaluation, or answered twice")
                    values = peer_values.metrics(msg.meta.get("metrics", {}))
                    if "n_examples" in msg.meta:
                        peer_values.count(msg.meta["n_examples"], "meta.n_examples",
                                          high=self.recipe.federation.max_examples_per_client)
                except MessageError as exc:
                    self._reject(round_, msg.sender, "evaluation", exc)
                    continue
                answered.add(msg.sender)
                if values:
                    self.client_eval[msg.sender] = values
                    reports[msg.sender] = values
                    self.run_dir.log(round_, msg.sender, "eval", {"scope": "client", **values})
            training = set(self.training)  # holdout clients are no part of the validation figure
            metrics = {**metrics, **self._validation(round_, {c: v for c, v in reports.items() if c in training})}
        self.timings.eval += time.perf_counter() - start
        self.reporter.eval_result(round_, metrics)
        return metrics

    def _validation(self, round_: int, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The clients' validation losses pooled per token (`val_loss`); bad values are refused."""
        pooled, bad = pooled_val_loss(reports)
        for client in bad:
            self._reject(round_, client, "validation figures", MessageError(
                "val_loss must be a finite number >= 0 and val_tokens a positive integer"))
        if pooled:
            self.run_dir.log(round_, None, "validation", pooled)
        return pooled

    # -- checkpoints and the end ----------------------------------------------------------------

    def checkpoint(self, round_: int) -> None:
        info = {"traffic": self.transport.traffic.state(), "wall_seconds": self._wall(),
                "initial": self.initial, "rejected": self.rejected, "missing": self.missing,
                "last_eval": self.last_eval, "client_eval": self.client_eval,
                "selection": self.selection.state(), **self.timings.state()}
        counters = self.transport.counter_state()
        if counters:
            info["transport"] = counters
        state = {k: v.contiguous() for k, v in self.strategy.state_dict().items()}
        state.update({PARTY + k: v.contiguous() for k, v in self.party.state_dict().items()})
        clients = self.client_state.state_dict() if self.client_state is not None else {}
        self.run_dir.save_checkpoint(
            Checkpoint(round_, {k: v.contiguous() for k, v in self.global_state.items()}, state, info,
                       client_state=clients, best_state=self.selection.best_state or {}),
            keep=self.recipe.output.keep_checkpoints,
        )

    def finish(self, round_: int) -> None:
        for client in self.clients:
            self.transport.send(Message(MessageKind.FINISH, round_, SERVER, client))
        self.transport.collect(round_, [], timeout=self.reply_timeout)

    def wall_seconds(self) -> float:
        return self._wall()


def mean_train_loss(updates: list[ClientUpdate]) -> float | None:
    """The weighted mean of the updates' train_loss (checked finite numbers); None without any."""
    pairs = [(float(u.metrics["train_loss"]), float(u.n_examples)) for u in updates
             if peer_values.is_number(u.metrics.get("train_loss"))]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs]))
