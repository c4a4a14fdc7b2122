"""FedAvg on numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.fedavg import fedavg_aggregate


def test_weighted_mean_of_local_models_by_hand():
    g = {"w": torch.tensor([1.0, 2.0])}
    # locals: [3, 2] with 1 example, [1, 5] with 3 examples -> mean = [(3 + 3)/4, (2 + 15)/4]
    deltas = [({"w": torch.tensor([2.0, 0.0])}, 1.0), ({"w": torch.tensor([0.0, 3.0])}, 3.0)]
    out = fedavg_aggregate(g, deltas)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 4.25]))
    assert g["w"].tolist() == [1.0, 2.0]  # pure: inputs untouched


def test_keeps_each_tensor_dtype():
    g = {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.ones(1, dtype=torch.float64)}
    d = {"a": torch.full((2,), 0.5, dtype=torch.bfloat16), "b": torch.full((1,), 0.25, dtype=torch.float64)}
    out = fedavg_aggregate(g, [(d, 1.0)])
    assert out["a"].dtype == torch.bfloat16 and out["b"].dtype == torch.float64
    assert out["a"].tolist() == [1.5, 1.5] and out["b"].tolist() == [1.25]


def test_refuses_nothing_to_average():
    with pytest.raises(ValueError):
        fedavg_aggregate({"w": torch.zeros(1)}, [])
    with pytest.raises(ValueError):
        fedavg_aggregate({"w": torch.zeros(1)}, [({"w": torch.ones(1)}, 0.0)])


@pytest.mark.parametrize("weighting,expected", [("examples", 2.5), ("uniform", 1.5)])
def test_strategy_weighting(weighting, expected):
    strategy = build_strategy("fedavg", {"weighting": weighting})
    updates = [ClientUpdate("a", {"w": torch.tensor([1.0])}, 1), ClientUpdate("b", {"w": torch.tensor([2.0])}, 3)]
    # examples: 0 + (1*1 + 2*3)/4 = 1.75 ; uniform: (1 + 2)/2 = 1.5 ; starting from 0.75 / 0
    out = strategy.aggregate_fit(1, {"w": torch.tensor([0.75 if weighting == "examples" else 0.0])}, updates)
    assert out["w"].item() == pytest.approx(expected)
    assert strategy.configure_fit(1, ["a", "b"], 0.1) == {"a": {"lr": 0.1}, "b": {"lr": 0.1}}
    assert strategy.state_dict() == {}
