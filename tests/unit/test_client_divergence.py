"""A client whose local work diverges (a loss or a tensor that is NaN or inf) sends an ERROR, not
the numbers: the server rejects and counts it and aggregates the others; the client's persistent
state is as it was before that round. On the hand-computable tiny federation (fast)."""

from __future__ import annotations

import pytest
import torch
from tiny_federation import LogitModel, examples, federation, recipe, sgd

ETA = 1.0
TRAIN = {"client_0": examples(0, [1, 1]), "client_1": examples(1, [0, 0])}


class Poisoned:
    """Wraps a client's procedure: trains as usual, writes a state tensor (to be undone), then
    spoils one figure of the outcome from round `from_round` on."""

    def __init__(self, inner, spoil, from_round: int = 1):
        self.inner, self.spoil, self.from_round = inner, spoil, from_round
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fit(self, ctx, adapter):
        self.calls += 1
        outcome = self.inner.fit(ctx, adapter)
        if ctx.round >= self.from_round:
            ctx.state["probe"] = torch.ones(2)
            self.spoil(outcome)
        return outcome


def _nan_update(outcome):
    outcome.update["w"] = torch.tensor([0.25, float("nan")])


def _inf_update(outcome):
    outcome.update["w"] = torch.tensor([float("-inf"), 0.0])


def _nan_loss(outcome):
    outcome.metrics["train_loss"] = float("nan")


def _inf_loss(outcome):
    outcome.metrics["train_loss"] = float("inf")


def _reason(fed, client):
    return [e["values"]["reason"] for e in fed.events("rejected") if e["client"] == client]


@pytest.mark.parametrize("spoil,problem", [
    (_nan_update, "tensor 'w' is not finite"),
    (_inf_update, "tensor 'w' is not finite"),
    (_nan_loss, "train_loss is nan"),
    (_inf_loss, "train_loss is inf"),
])
def test_a_diverging_client_sends_an_error_and_the_others_are_aggregated(tmp_path, spoil, problem):
    fed = federation(recipe("fedavg", 2, lr=ETA, tmp=tmp_path), LogitModel([0.0, 0.0]), TRAIN, tmp=tmp_path)
    poisoned = Poisoned(fed.clients["client_1"].local, spoil)
    fed.clients["client_1"].local = poisoned
    fed.round(1)
    assert poisoned.calls == 1
    # client_0 alone: w_0 ← 0 − η(σ(0) − 1) = 0.5; client_1's token-1 step never arrives
    assert fed.server.global_state["w"].tolist() == pytest.approx([sgd(0.0, 1.0, ETA), 0.0], abs=1e-7)
    assert (fed.server.rejected, fed.server.missing) == (1, 1)
    assert _reason(fed, "client_1") == [
        f"client reported: local training in round 1 diverged ({problem}); nothing is sent. "
        "Lower train.lr (asked: 1) or set train.max_grad_norm"]
    assert fed.clients["client_1"].state == {}       # the probe it wrote is undone
    assert fed.clients["client_1"].rejected == 0     # the server's message was fine
    assert [e["client"] for e in fed.events("fit")] == ["client_0"]


def test_a_diverging_round_leaves_the_state_of_the_round_before(tmp_path):
    """SCAFFOLD keeps a control variate per client: client_1 diverges in round 2, so its state
    stays the one of round 1, tensor for tensor, and holds nothing it wrote in round 2."""
    fed = federation(recipe("scaffold", 2, lr=ETA, tmp=tmp_path), LogitModel([0.0, 0.0]), TRAIN,
                     tmp=tmp_path)
    poisoned = Poisoned(fed.clients["client_1"].local, _nan_update, from_round=2)
    fed.clients["client_1"].local = poisoned
    fed.round(1)
    after_one = {k: v.clone() for k, v in fed.clients["client_1"].state.items()}
    assert after_one and "probe" not in after_one
    fed.round(2)
    assert poisoned.calls == 2
    state = fed.clients["client_1"].state
    assert set(state) == set(after_one)
    assert all(torch.equal(state[k], after_one[k]) for k in after_one)
    assert fed.server.rejected == 1
