"""FedProx's proximal term and SCAFFOLD's aggregation on numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.fedprox import proximal_term
from fedtune.algorithms.scaffold import DC, scaffold_aggregate


def test_proximal_term_by_hand():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    anchor = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.5]])}
    # ‖(1, 2)‖² + ‖-1‖² = 5 + 1 = 6 ; μ/2 · 6 with μ = 0.1 -> 0.3
    assert proximal_term(params, anchor, 0.1).item() == pytest.approx(0.3)


def test_scaffold_aggregate_by_hand():
    x = {"w": torch.tensor([1.0, 1.0])}
    c = {"w": torch.tensor([0.0, 0.5])}
    updates = [({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.2, 0.0])}, 1.0),
               ({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([0.4, 1.0])}, 1.0)]
    new_x, new_c = scaffold_aggregate(x, c, updates, global_lr=0.5, n_clients=4)
    # mean Δy = (0.5, 1.0); x + 0.5 · that = (1.25, 1.5)
    torch.testing.assert_close(new_x["w"], torch.tensor([1.25, 1.5]))
    # c + (Δc_1 + Δc_2) / N = (0, 0.5) + (0.6, 1.0) / 4 = (0.15, 0.75)
    torch.testing.assert_close(new_c["w"], torch.tensor([0.15, 0.75]))


def test_scaffold_strategy_broadcasts_and_checkpoints_its_control_variate():
    s = build_strategy("scaffold", {}, n_clients=2)
    g = {"w": torch.zeros(2)}
    assert torch.equal(s.fit_tensors(1, g)["scaffold/c/w"], torch.zeros(2))
    u = ClientUpdate("a", {"w": torch.ones(2), DC + "w": torch.full((2,), 2.0)}, 3)
    s.aggregate_fit(1, g, [u])
    assert s.state_dict()["scaffold/c/w"].tolist() == [1.0, 1.0]
    t = build_strategy("scaffold", {}, n_clients=2)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.fit_tensors(2, g)["scaffold/c/w"], torch.ones(2))
