"""DP-FedAvg: clipping and averaging by hand, the noise's spread, the accountant's epsilon."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.dp_fedavg import clip_update, dp_epsilon, dp_fedavg_aggregate


def test_clip_update_by_hand():
    clipped, norm = clip_update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].item() == pytest.approx(0.6) and clipped["b"].item() == pytest.approx(0.8)
    small, _ = clip_update({"a": torch.tensor([0.3])}, 1.0)
    assert small["a"].item() == pytest.approx(0.3)


def test_without_noise_it_is_the_mean_of_clipped_updates():
    g = {"w": torch.tensor([1.0, 1.0])}
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.5, 0.0])}]
    out = dp_fedavg_aggregate(g, ups, clip_norm=1.0, noise_multiplier=0.0, generator=torch.Generator())
    # clipped: (0.6, 0.8) and (0.5, 0); mean (0.55, 0.4)
    torch.testing.assert_close(out["w"], torch.tensor([1.55, 1.4]))


def test_noise_has_the_calibrated_spread():
    g = {"w": torch.zeros(20000)}
    ups = [{"w": torch.zeros(20000)} for _ in range(4)]
    out = dp_fedavg_aggregate(g, ups, clip_norm=2.0, noise_multiplier=1.5,
                              generator=torch.Generator().manual_seed(0))
    assert out["w"].std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.03)
    assert abs(out["w"].mean().item()) < 0.02


def test_epsilon_matches_the_accountant_reference():
    # Poisson rate 0.1, noise multiplier 1.0, 100 rounds, delta 1e-5: the RDP accountant's value.
    assert dp_epsilon(1.0, [0.1] * 100, 1e-5) == pytest.approx(7.90385, rel=1e-4)
    assert dp_epsilon(1.0, [], 1e-5) == 0.0
    assert dp_epsilon(0.0, [0.1], 1e-5) == float("inf")
    assert dp_epsilon(2.0, [0.1] * 100, 1e-5) < dp_epsilon(1.0, [0.1] * 100, 1e-5)


def test_strategy_reports_epsilon_and_checkpoints_its_rates():
    s = build_strategy("dp_fedavg", {"noise_multiplier": 1.0, "noise_seed": 1}, n_clients=10)
    g = {"w": torch.zeros(3)}
    s.aggregate_fit(1, g, [ClientUpdate("a", {"w": torch.ones(3)}, 5)])
    metrics = s.round_metrics()
    assert metrics["epsilon"] == pytest.approx(dp_epsilon(1.0, [0.1], 1e-5))
    assert metrics["clipped_fraction"] == 1.0  # ‖(1,1,1)‖ > 1
    t = build_strategy("dp_fedavg", {"noise_multiplier": 1.0, "noise_seed": 1}, n_clients=10)
    t.load_state_dict(s.state_dict())
    assert t.round_metrics()["epsilon"] == metrics["epsilon"]
