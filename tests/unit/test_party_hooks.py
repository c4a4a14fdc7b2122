"""The algorithm hooks the next algorithms plug into: a client's personal model evaluated beside
the global one (LocalProcedure.personal), and server-side work between rounds with its own
checkpointed state (Party.after_round, Party.state_dict), on the hand-computable tiny federation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_federation import LogitModel, examples, federation, recipe, sgd

from conftest import LossEvaluator
from fedtune.algorithms.base import LocalOutcome, StandardLocal
from fedtune.algorithms.party import StandardParty
from fedtune.runtime.server import Server
from fedtune.wire import Message, MessageKind


class KeepsPersonal:
    """Plain training, and a personal model of its own: w = 3 on token 0 (in the client state)."""

    def __init__(self):
        self.standard = StandardLocal()

    def server_tensor_specs(self, adapter):
        return {}

    def fit(self, ctx, global_state) -> LocalOutcome:
        ctx.state["personal/w"] = torch.tensor([3.0, 0.0])
        return self.standard.fit(ctx, global_state)

    def personal(self, ctx):
        return {"w": ctx.state["personal/w"]} if "personal/w" in ctx.state else None


def _loss(w: float, answers: list[int]) -> float:
    return sum(math.log1p(math.exp(w)) - y * w for y in answers) / len(answers)


def test_a_client_reports_its_personal_model_beside_the_global_one(tmp_path):
    model = LogitModel([0.0, 0.0])
    test = examples(0, [1, 0, 1, 1])
    fed = federation(recipe("fedavg", 1, tmp=tmp_path), model, {"client_0": examples(0, [1, 1])},
                     tmp=tmp_path, evaluator=LossEvaluator(model),
                     test={"client_0": (test, [None] * 4)})
    client = fed.clients["client_0"]
    global_w = {"w": torch.tensor([0.5, 0.0])}

    before = client.evaluate(Message(MessageKind.EVALUATE, 1, "server", "client_0", tensors=global_w))
    assert "personal_loss" not in before.meta["metrics"]  # the standard procedure has none

    client.local = KeepsPersonal()
    client.fit(Message(MessageKind.FIT, 1, "server", "client_0", tensors={"w": torch.zeros(2)},
                       meta={"lr": 1.0}))
    reply = client.evaluate(Message(MessageKind.EVALUATE, 1, "server", "client_0", tensors=global_w))
    metrics = reply.meta["metrics"]
    assert metrics["loss"] == pytest.approx(_loss(0.5, [1, 0, 1, 1]), abs=1e-6)
    assert metrics["personal_loss"] == pytest.approx(_loss(3.0, [1, 0, 1, 1]), abs=1e-6)
    assert set(client.state) == {"personal/w"}  # kept (and checkpointed) with the client's state


class AddsOneBetweenRounds(StandardParty):
    """Server-side work between rounds: w += 1 after each aggregation, counted in its own state."""

    def __init__(self):
        self.count = torch.zeros(1)

    def after_round(self, round_, global_state):
        self.count += 1
        return {"w": global_state["w"] + 1.0}

    def state_dict(self):
        return {"count": self.count.clone()}

    def load_state_dict(self, state):
        self.count = state["count"].clone()


def test_server_side_work_between_rounds_and_its_checkpointed_state(tmp_path):
    r = recipe("fedavg", 1, tmp=tmp_path, output={"checkpoint_every": 1})
    fed = federation(r, LogitModel([0.0, 0.0]), {"client_0": examples(0, [1, 1])}, tmp=tmp_path)
    party = AddsOneBetweenRounds()
    fed.server.party = party
    w = 0.0
    for round_ in (1, 2):
        w = sgd(w, 1.0, lr=1.0) + 1.0  # the client's step (f = 1), then the party's +1
        assert fed.round(round_)["w"][0].item() == pytest.approx(w, abs=1e-6)
        fed.server.checkpoint(round_)
    assert party.count.item() == 2

    resumed_party = AddsOneBetweenRounds()
    resumed = Server(r, strategy=fed.server.strategy, transport=fed.transport, clients=["client_0"],
                     global_state={"w": torch.zeros(2)}, run_dir=fed.run_dir, party=resumed_party)
    assert resumed.restore(fed.run_dir.latest_checkpoint()) == 3
    assert resumed_party.count.item() == 2
    assert resumed.global_state["w"][0].item() == pytest.approx(w, abs=1e-6)
