"""Several clients' FIT messages answered together: their local training batched (train/multi_lora.py).

Each client runs its own unchanged `fit` (checks, its algorithm's local procedure, its reply) in a
worker thread, on a slot of its own tensors and a trainer that only records what it asks for;
when every client of the group has asked, the engine trains them all at once and each `fit`
continues with its result. Local procedures that declare themselves batchable
(algorithms.base.batchable: plain training, FedProx's and SCAFFOLD's today) run batched; everything else (other procedures, attacks, other adapter methods,
DP-SGD, packing, fp16 scaling, clients with different numbers of local steps) runs one client
after another, with the reason logged once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from fedtune.algorithms.base import ModelView, batchable
from fedtune.runtime.client import Client
from fedtune.train.local import LocalResult, LocalTrainer, steps_for
from fedtune.train.multi_lora import Job, MultiLoRA, NotBatchable
from fedtune.transport.codec import check_message
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.batched")

class _OwnSlot:
    """One client's trainable tensors during a batched fit (AdapterSlot's interface)."""

    def __init__(self, engine: MultiLoRA):
        self.engine = engine
        self.params: dict[str, torch.Tensor] = {}

    def set(self, state: dict[str, torch.Tensor]) -> None:
        self.params = self.engine.leaves(state)

    def get(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.params.items()}


class _Recording:
    """A LocalTrainer stand-in: `train` hands the request to the group and waits for its result."""

    def __init__(self, trainer: LocalTrainer, slot: _OwnSlot, index: int, asks: queue.Queue):
        self.section = trainer.section
        self.slot, self.index, self.asks = slot, index, asks
        self.done = threading.Event()
        self.result: LocalResult | BaseException | None = None

    def train(self, examples, *, lr: float, seed: int, extra_loss=None, before_step=None) -> LocalResult:
        self.asks.put(("train", self.index, Job(examples, lr, seed, self.slot.params, extra_loss, before_step)))
        self.done.wait()
        if isinstance(self.result, BaseException):
            raise self.result
        assert self.result is not None
        return self.result


class BatchedFits:
    """Answers groups of FIT messages with one batched local training per group."""

    def __init__(self, trainer: LocalTrainer, slot_params: dict[str, torch.nn.Parameter], k: int):
        self.trainer, self.k = trainer, k
        self.engine: MultiLoRA | None = None
        self.refusal: str | None = None
        try:
            MultiLoRA.check_trainer(trainer)
            self.engine = MultiLoRA(trainer, slot_params)
        except NotBatchable as exc:
            self.refusal = str(exc)
            log.warning("federation.parallel_clients=%d: clients train one after another: %s", k, exc)
        self._said: set[str] = set()

    def accepts(self, client: Client, msg: Message) -> bool:
        """Whether this FIT of `client` can join a batched group."""
        if self.engine is None or msg.kind != MessageKind.FIT or client.secagg.wants(msg):
            return False
        reason = None
        if not batchable(client.local):
            reason = f"{type(client.local).__name__} (a local procedure that does not declare itself batchable)"
        elif type(client.view) is not ModelView:
            reason = f"the algorithm's {type(client.view).__name__}"
        if reason is not None:
            if reason not in self._said:
                self._said.add(reason)
                log.warning("federation.parallel_clients: %s runs one client after another", reason)
            return False
        return True

    def steps(self, client: Client) -> int:
        return steps_for(self.trainer.section, len(client.data.train))

    def answer(self, group: list[tuple[Client, Message]]) -> list[bytes | None]:
        """The encoded replies of a group of accepted FITs, in the group's order."""
        assert self.engine is not None
        asks: queue.Queue = queue.Queue()
        replies: list[bytes | None] = [None] * len(group)
        errors: list[BaseException | None] = [None] * len(group)
        trainers: list[_Recording] = []
        threads = []
        for i, (client, msg) in enumerate(group):
            slot = _OwnSlot(self.engine)
            trainer = _Recording(self.trainer, slot, i, asks)
            trainers.append(trainer)
            how = _fit_with(client, slot, trainer)
            thread = threading.Thread(target=_run, args=(client, msg, how, i, asks, replies, errors),
                                      name=f"fit-{client.name}", daemon=True)
            threads.append(thread)
            thread.start()
        jobs: dict[int, Job] = {}
        waiting = set(range(len(group)))
        while waiting:  # every fit has asked to train, or finished without (an error reply)
            kind, i, payload = asks.get()
            waiting.discard(i)
            if kind == "train":
                jobs[i] = payload
        by_steps: dict[int, list[int]] = {}
        for i in jobs:  # equal local work trains together; unequal groups one after another
            by_steps.setdefault(self.steps(group[i][0]), []).append(i)
        for members in by_steps.values():
            try:
                results: list[LocalResult | BaseException] = list(
                    self.engine.train([jobs[i] for i in members]))
            except BaseException as exc:  # each fit raises it (a FedtuneError becomes its ERROR reply)
                results = [exc] * len(members)
            for i, result in zip(members, results):
                trainers[i].result = result
                trainers[i].done.set()
        for thread in threads:
            thread.join()
        for error in errors:  # not a FedtuneError (which became an ERROR reply): as sequential would
            if error is not None:
                raise error
        return replies


def _fit_with(client: Client, slot: _OwnSlot, trainer: _Recording) -> Callable[[Message], Message]:
    def how(msg: Message) -> Message:
        check_message(msg, kinds={MessageKind.FIT}, sender=client.server)
        return client.fit(msg, slot=slot, trainer=trainer)   # type: ignore[arg-type]
    return how


def _run(client: Client, msg: Message, how: Callable[[Message], Message], i: int,
         asks: queue.Queue, replies: list[bytes | None], errors: list[BaseException | None]) -> None:
    try:
        replies[i] = client.answer(msg, how)
    except BaseException as exc:  # raised again by the group, in the caller's thread
        errors[i] = exc
    finally:
        asks.put(("done", i, None))
