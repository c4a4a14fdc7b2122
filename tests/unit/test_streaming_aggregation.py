"""Streaming aggregation: weighted-sum strategies fold each update in as it arrives (the server
keeps none of their tensors), equal to the collected aggregate; robust ones keep collecting."""

from __future__ import annotations

import pytest
import torch
from test_server_rules import ONE_ZERO, THREE_ONES, TWO_ZEROS, build, state, toks
from tiny_federation import LogitModel, federation, recipe

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.folding import WeightedSum
from fedtune.runtime.server import Server

GLOBAL = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5], dtype=torch.float64)}
UPDATES = [ClientUpdate("a", {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0], dtype=torch.float64)}, 1),
           ClientUpdate("b", {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([-2.0], dtype=torch.float64)}, 3)]


def _streamed(strategy, round_=1):
    fold = strategy.fold(round_, GLOBAL)
    for update in UPDATES:
        fold.add(ClientUpdate(update.client, dict(update.tensors), update.n_examples))
    return fold.finish()


def test_weighted_sum_by_hand():
    running = WeightedSum(GLOBAL)
    for u in UPDATES:
        running.add(u.tensors, u.n_examples)
    mean = running.mean()
    # (1·(1, 0) + 3·(0, 4)) / 4 = (0.25, 3);  (1·2 + 3·(−2)) / 4 = −1
    assert mean["w"].tolist() == [0.25, 3.0] and mean["b"].tolist() == [-1.0]
    assert mean["b"].dtype == torch.float64 and running.total == 4.0 and running.count == 2
    with pytest.raises(ValueError, match="at least one"):
        WeightedSum(GLOBAL).mean()


@pytest.mark.parametrize("weighting,w,b", [
    ("examples", [1.25, 5.0], [-0.5]),   # global + (0.25, 3), 0.5 − 1
    ("uniform", [1.5, 4.0], [0.5]),      # global + (0.5, 2), 0.5 + 0
])
def test_fedavg_streamed_equals_collected_and_the_hand_computed_value(weighting, w, b):
    strategy = build_strategy("fedavg", {"weighting": weighting}, 2)
    uniform = weighting == "uniform"
    updates = [ClientUpdate(u.client, u.tensors, 1 if uniform else u.n_examples) for u in UPDATES]
    collected = strategy.aggregate_fit(1, GLOBAL, updates)
    fold = strategy.fold(1, GLOBAL)
    for u in updates:
        fold.add(u)
    streamed = fold.finish()
    assert streamed["w"].tolist() == w and streamed["b"].tolist() == b
    for name in GLOBAL:
        assert torch.equal(streamed[name], collected[name]) and streamed[name].dtype == GLOBAL[name].dtype


def test_fedavgm_streamed_equals_collected_by_hand():
    # v = Δ = (0.25, 3), x = g + 0.5·v in round 1; round 2 the same updates: v = 0.9·v + Δ
    collect, stream = (build_strategy("fedavgm", {"server_lr": 0.5, "momentum": 0.9}, 2) for _ in range(2))
    first = collect.aggregate_fit(1, GLOBAL, UPDATES)
    assert first["w"].tolist() == [1.125, 3.5]
    assert torch.equal(_streamed(stream, 1)["w"], first["w"])
    second = collect.aggregate_fit(2, GLOBAL, UPDATES)
    assert second["w"].tolist() == pytest.approx([1.0 + 0.5 * 1.9 * 0.25, 2.0 + 0.5 * 1.9 * 3.0])
    assert torch.equal(_streamed(stream, 2)["w"], second["w"])


def test_dp_fedavg_streamed_equals_collected_by_hand():
    options = {"clip_norm": 1.0, "noise_multiplier": 0.0, "noise_seed": 1}
    collect, stream = (build_strategy("dp_fedavg", options, 4) for _ in range(2))
    updates = [ClientUpdate("a", {"w": torch.tensor([3.0, 4.0])}, 7),   # norm 5: clipped to (0.6, 0.8)
               ClientUpdate("b", {"w": torch.tensor([0.0, 0.5])}, 1)]   # inside the clip
    g = {"w": torch.tensor([1.0, 1.0])}
    collected = collect.aggregate_fit(1, g, updates)
    fold = stream.fold(1, g)
    for u in updates:
        fold.add(u)
    streamed = fold.finish()
    assert streamed["w"].tolist() == pytest.approx([1.3, 1.65])   # uniform mean of clipped
    assert torch.equal(streamed["w"], collected["w"])
    assert stream.round_metrics()["clipped_fraction"] == collect.round_metrics()["clipped_fraction"] == 0.5
    assert stream.rates == collect.rates == [0.5]


def _captured_outcomes(fed, monkeypatch):
    outcomes = []
    original = Server._aggregate

    def capture(self, round_, outcome):
        outcomes.append(outcome)
        return original(self, round_, outcome)
    monkeypatch.setattr(Server, "_aggregate", capture)
    return outcomes


def test_the_server_folds_fedavg_updates_and_keeps_none_of_their_tensors(tmp_path, monkeypatch):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO, TWO_ZEROS])
    outcomes = _captured_outcomes(fed, monkeypatch)
    fed.round(1)
    # Δ = (0.5, 0)·3, (0, −0.5)·1, (−0.5, 0)·2 over 6 examples
    assert state(fed) == pytest.approx([(3 * 0.5 - 2 * 0.5) / 6, -0.5 / 6])
    (outcome,) = outcomes
    assert outcome.fold is not None and [u.client for u in outcome.updates] == ["client_0", "client_1", "client_2"]
    assert all(u.tensors == {} for u in outcome.updates) and [u.n_examples for u in outcome.updates] == [3, 1, 2]


def test_a_robust_strategy_keeps_collecting_every_update(tmp_path, monkeypatch):
    names = ["client_0", "client_1", "client_2"]
    fed = federation(recipe("median", 3, tmp=tmp_path), LogitModel([0.0, 0.0]),
                     dict(zip(names, map(toks, [THREE_ONES, ONE_ZERO, TWO_ZEROS]))),
                     tmp=tmp_path)
    outcomes = _captured_outcomes(fed, monkeypatch)
    fed.round(1)
    (outcome,) = outcomes
    assert outcome.fold is None and all(set(u.tensors) == {"w"} for u in outcome.updates)
    assert state(fed) == pytest.approx([0.0, 0.0])   # medians of (0.5, 0, −0.5) and (0, −0.5, 0)



def test_the_aggregate_does_not_depend_on_the_order_updates_arrive_in():
    """A deployment folds replies as they race in. Eight float32 updates of 4096 values with
    uneven weights, folded in 20 random orders, give the same bits every time (a float32 running
    sum would not: its rounding depends on the order, which this check would catch)."""
    gen = torch.Generator().manual_seed(1)
    like = {"w": torch.zeros(4096)}
    updates = [ClientUpdate(f"c{i}", {"w": torch.randn(4096, generator=gen) * 10 ** (i % 4)}, 1 + 7 * i)
               for i in range(8)]
    strategy = build_strategy("fedavg", {})
    results = []
    for _ in range(20):
        order = torch.randperm(8, generator=gen).tolist()
        fold = strategy.fold(1, like)
        for i in order:
            fold.add(ClientUpdate(updates[i].client, dict(updates[i].tensors), updates[i].n_examples))
        results.append(fold.finish()["w"])
    assert all(torch.equal(r, results[0]) for r in results)
    # and a float32 running sum in those orders differs somewhere (the check has teeth)
    sums = []
    for _ in range(20):
        acc = torch.zeros(4096)
        for i in torch.randperm(8, generator=gen).tolist():
            acc.add_(updates[i].tensors["w"], alpha=updates[i].n_examples)
        sums.append(acc)
    assert not all(torch.equal(s, sums[0]) for s in sums)
