"""A federated client: answers the server's messages with local training and evaluation.

The same class runs in simulation (many clients sharing one model, taking turns) and in a real
deployment (one client per process). It touches the model only through its AdapterSlot.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.algorithms.base import (
    LocalContext,
    LocalProcedure,
    ModelView,
    PersonalContext,
    StandardLocal,
    State,
)
from fedtune.data.examples import Example
from fedtune.data.prompts import TokenizedExample
from fedtune.errors import FedtuneError, MessageError
from fedtune.eval.evaluator import Evaluator
from fedtune.eval.predictions import predictions_path, write_predictions
from fedtune.models.adapters import AdapterSlot
from fedtune.runtime import peer_values
from fedtune.runtime.secure_client import SecAggParticipant
from fedtune.seeding import derive_seed
from fedtune.train.dp_sgd import record_dp_steps
from fedtune.train.local import LocalTrainer
from fedtune.transport.adapter_wire import AdapterWire
from fedtune.transport.codec import all_finite, check_message, decode, encode, specs_of
from fedtune.transport.compression import CompressionConfig
from fedtune.wire import DOWN_ONLY, Message, MessageKind, TensorSpec

log = logging.getLogger("fedtune.client")


class LocalDivergence(FedtuneError):
    """This client's local training produced a non-finite loss or update (the server is told)."""


def _not_finite(metrics: dict, tensors: State) -> str | None:
    """What is not finite in a fit's outcome ('train_loss is nan', 'tensor x has inf'), or None."""
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    for name, tensor in tensors.items():
        if tensor.dtype.is_floating_point and not all_finite(tensor):
            return f"tensor '{name}' is not finite"
    return None


@dataclass
class ClientDataset:
    """A client's own data, tokenized: train for local work, test for evaluation, val (held out
    from training) for the validation loss."""

    train: list[TokenizedExample]
    test: list[TokenizedExample]
    test_raw: list[Example]
    val: list[TokenizedExample] = field(default_factory=list)


class Client:
    def __init__(
        self,
        name: str,
        data: ClientDataset,
        *,
        slot: AdapterSlot,
        trainer: LocalTrainer,
        evaluator: Evaluator | None,
        seed: int,
        local: LocalProcedure | None = None,
        compression: tuple[CompressionConfig, CompressionConfig] | None = None,
        server: str = "server",
        max_message_bytes: int | None = None,
        view: ModelView | None = None,
        specs: dict[str, TensorSpec] | None = None,
    ):
        """`specs`: the global state's tensor specs where the caller knows them (a simulation's
        clients share one set), saving a copy of the adapter to read them."""
        self.name = name
        self.local = local or StandardLocal()
        self.state: State = {}  # persistent algorithm state of this client (CPU tensors)
        self.data = data
        self.slot = slot
        self.trainer = trainer
        self.evaluator = evaluator
        self.seed = seed
        self.server = server
        self.max_message_bytes = max_message_bytes
        self.rejected = 0  # messages from the server refused (undecodable, or a bad value)
        self.secagg = SecAggParticipant(name)  # secure-aggregation rounds (runtime/secure_client.py)
        self.view = view or ModelView(slot)  # how the global state becomes the model's tensors
        self._specs = dict(specs) if specs is not None else specs_of(self.view.initial())
        up, down = compression or (CompressionConfig(), CompressionConfig())
        upload = {k: v for k, v in self._specs.items() if not k.startswith(DOWN_ONLY)}  # wire.DOWN_ONLY
        self.up, self.down = AdapterWire(up, upload), AdapterWire(down, self._specs)
        self.predictions_dir: Path | None = None  # where this client writes its predictions
        # A backdoor experiment (federation.attack): (generate, test examples) -> attack success on
        # this client's test part, for its global and personal model (client_factory sets it).
        self.backdoor_probe: Callable[[Callable, list[Example]], dict] | None = None

    # -- message handling -----------------------------------------------------------------------

    def handle(self, msg: Message) -> Message | None:
        if self.secagg.wants(msg):
            return self.secagg.handle(self, msg)
        check_message(msg, kinds={MessageKind.FIT, MessageKind.EVALUATE, MessageKind.FINISH},
                      sender=self.server)
        if msg.kind == MessageKind.FIT:
            return self.fit(msg)
        if msg.kind == MessageKind.EVALUATE:
            return self.evaluate(msg)
        return None

    def handle_bytes(self, data: bytes) -> bytes | None:
        """Transport endpoint: decode, handle, encode. A bad message gets an ERROR reply."""
        msg = self.decode(data)
        return None if msg is None else self.answer(msg, self.handle)

    def decode(self, data: bytes) -> Message | None:
        """The server's message, or None (rejected and counted) if it does not decode."""
        try:
            return decode(data, max_bytes=self.max_message_bytes)
        except MessageError as exc:
            self.rejected += 1
            log.warning("%s: rejected a message: %s", self.name, exc)
            return None

    def answer(self, msg: Message, how: Callable[[Message], Message | None]) -> bytes | None:
        """`how(msg)` encoded; a FedtuneError becomes an ERROR reply (counted)."""
        try:
            reply = how(msg)
        except LocalDivergence as exc:  # the request was fine; this client's work was not
            reply = self._error(msg, exc)
        except FedtuneError as exc:
            self.rejected += 1
            reply = self._error(msg, exc)
        if reply is None:
            return None
        try:
            return encode(reply)
        except MessageError as exc:  # e.g. a metric that is not finite cannot travel
            return encode(self._error(msg, exc))

    def _error(self, msg: Message, exc: Exception) -> Message:
        """The ERROR reply saying why `msg` got no answer (the server logs and counts it)."""
        log.warning("%s: cannot handle %s of round %d: %s", self.name, msg.kind.value, msg.round, exc)
        return Message(MessageKind.ERROR, msg.round, self.name, self.server, meta={"error": str(exc)[:500]})

    def _load_global(self, msg: Message, extra_specs: dict | None = None,
                     slot: AdapterSlot | None = None) -> tuple[State, State]:
        """Check the message's tensors, load the global adapter (into `slot` if given, else
        through the view); returns (adapter, extra tensors)."""
        check_message(msg, kinds={msg.kind}, tensor_specs={**self.down.wire, **(extra_specs or {})})
        wire, extra = self.down.split(msg.tensors)
        adapter = self.down.unpack(wire)
        if slot is None:
            self.view.load(adapter)
        else:
            slot.set(adapter)
        return adapter, extra

    def fit(self, msg: Message, *, slot: AdapterSlot | None = None,
            trainer: LocalTrainer | None = None) -> Message:
        """Local training on the global adapter of `msg`. `slot` and `trainer`: where this
        client's tensors live and what trains them when not the shared model's (batched
        multi-client training, runtime/batched.py)."""
        if "lr" not in msg.meta:
            raise MessageError(f"fit message of round {msg.round} has no 'lr' in its meta")
        lr = peer_values.learning_rate(msg.meta["lr"], f"fit message of round {msg.round}: meta.lr")
        adapter, extra = self._load_global(msg, self.local.server_tensor_specs(self._specs), slot)
        ctx = LocalContext(
            client=self.name, round=msg.round, seed=derive_seed(self.seed, "fit", msg.round, self.name),
            lr=lr, slot=slot or self.slot, trainer=trainer or self.trainer, train=self.data.train,
            state=self.state, server_tensors=extra, meta=msg.meta, val_loss=self._val_loss(slot),
        )
        before = dict(self.state)  # procedures replace state tensors, never change them in place
        outcome = self.local.fit(ctx, adapter)
        problem = _not_finite(outcome.metrics, {**outcome.update, **outcome.extra})
        if problem is not None:  # the round's work is dropped: the state is as if it never ran
            self.state.clear()
            self.state.update(before)
            raise LocalDivergence(
                f"local training in round {msg.round} diverged ({problem}); nothing is sent. "
                f"Lower train.lr (asked: {lr:g}) or set train.max_grad_norm")
        outcome.metrics.setdefault("lr", lr)
        if self.trainer.section.dp_sgd is not None:  # this client's (ε, δ) over all its rounds
            record_dp_steps(self.state, outcome.metrics, self.trainer.section.dp_sgd)
        return Message(MessageKind.UPDATE, msg.round, self.name, self.server,
                       tensors={**self.up.pack(outcome.update, self.state), **outcome.extra},
                       meta={"n_examples": len(self.data.train), "metrics": outcome.metrics})

    def _val_loss(self, slot: AdapterSlot | None) -> Callable[[], dict] | None:
        """The validation loss of the shared model, for a local procedure that scores its work
        (FedEx); None without validation data, or when training in a slot of its own (batched)."""
        if self.evaluator is None or not self.data.val or slot is not None:
            return None
        return lambda: self.evaluator.loss(self.data.val)

    def _evaluate_personal(self, round_: int, global_state: State, generate: bool) -> dict:
        """The algorithm's personal model of this client (LocalProcedure.personal: tensors
        overlaid on the global model in the slot) on its test part, as `personal_<metric>`
        (generating answers when the global model's are; {} without one)."""
        if self.evaluator is None or not self.data.test:
            return {}
        ctx = PersonalContext(client=self.name, round=round_,
                              seed=derive_seed(self.seed, "personal", round_, self.name),
                              slot=self.slot, trainer=self.trainer, train=self.data.train,
                              state=self.state, global_state=global_state)
        personal = self.local.personal(ctx)
        if personal is None:
            return {}
        self.slot.overlay(personal)
        found = self.evaluator.evaluate(self.data.test, self.data.test_raw, with_generation=generate)
        found.update(self._backdoor(generate))
        return {f"personal_{k}": v for k, v in found.items() if k != "n_examples"}

    def _backdoor(self, generate: bool) -> dict:
        """The backdoor's success on this client's triggered test prompts (the model now loaded)."""
        if self.backdoor_probe is None or not generate or self.evaluator is None or not self.data.test_raw:
            return {}
        return self.backdoor_probe(self.evaluator.generate, self.data.test_raw)

    def evaluate(self, msg: Message) -> Message:
        """The global adapter on this client's test part (generating answers when the server asks,
        the predictions written to `predictions_dir`, never sent) and its validation part (loss)."""
        generate = peer_values.flag(msg.meta.get("generate", False), "evaluate message: meta.generate")
        adapter, _ = self._load_global(msg)
        metrics: dict = {}
        if self.evaluator is not None and self.data.test:
            records: list[dict] = []
            metrics = self.evaluator.evaluate(self.data.test, self.data.test_raw,
                                              with_generation=generate, predictions=records)
            if records and self.predictions_dir is not None:
                path = predictions_path(self.predictions_dir, msg.round, self.name)
                try:
                    write_predictions(path, records)
                except OSError as exc:  # the figures still go to the server
                    log.warning("%s: could not write its predictions to %s: %s", self.name, path, exc)
        metrics.update(self._backdoor(generate))
        if self.evaluator is not None and self.data.val:
            val = self.evaluator.loss(self.data.val)
            if "loss" in val:
                metrics.update(val_loss=val["loss"], val_tokens=val["n_tokens"])
        metrics.update(self._evaluate_personal(msg.round, adapter, generate))
        return Message(MessageKind.EVAL_RESULT, msg.round, self.name, self.server,
                       meta={"n_examples": len(self.data.test), "metrics": metrics})
