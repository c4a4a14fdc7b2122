"""Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) on numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.fedopt import fedadagrad_step, fedyogi_step, pseudo_gradient
from fedtune.errors import RecipeError

ADAPTIVE = ["fedadam", "fedyogi", "fedadagrad"]


def x0() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, 2.0])}


def round_one() -> list[ClientUpdate]:
    # by examples: Δ = ([0.2, -0.4]·1 + [0.6, 0.0]·3) / 4 = [2.0/4, -0.4/4] = [0.5, -0.1]
    return [ClientUpdate("a", {"w": torch.tensor([0.2, -0.4])}, 1),
            ClientUpdate("b", {"w": torch.tensor([0.6, 0.0])}, 3)]


def round_two() -> list[ClientUpdate]:
    # by examples: Δ = ([0.0, 0.4]·1 + [0.4, 0.0]·3) / 4 = [1.2/4, 0.4/4] = [0.3, 0.1]
    return [ClientUpdate("a", {"w": torch.tensor([0.0, 0.4])}, 1),
            ClientUpdate("b", {"w": torch.tensor([0.4, 0.0])}, 3)]


def test_pseudo_gradient_is_the_weighted_mean_update():
    out = pseudo_gradient(x0(), [(u.tensors, float(u.n_examples)) for u in round_one()])
    torch.testing.assert_close(out["w"], torch.tensor([0.5, -0.1]))


def test_fedadam_two_rounds_by_hand():
    s = build_strategy("fedadam", {"server_lr": 0.1})  # β1 0.9, β2 0.99, τ 1e-3
    x1 = s.aggregate_fit(1, x0(), round_one())
    # Δ = [0.5, -0.1]; m1 = 0.1·Δ = [0.05, -0.01]; v1 = 0.01·Δ² = [0.0025, 0.0001]; √v1 = [0.05, 0.01]
    # x1 = x0 + 0.1·m1/(√v1 + τ) = [1 + 0.005/0.051, 2 - 0.001/0.011]
    torch.testing.assert_close(x1["w"], torch.tensor([1 + 0.005 / 0.051, 2 - 0.001 / 0.011]))
    torch.testing.assert_close(s.state_dict()["m/w"], torch.tensor([0.05, -0.01]))
    torch.testing.assert_close(s.state_dict()["v/w"], torch.tensor([0.0025, 0.0001]))
    x2 = s.aggregate_fit(2, x1, round_one())
    # m2 = 0.9·m1 + 0.1·Δ = [0.045 + 0.05, -0.009 - 0.01] = [0.095, -0.019]
    # v2 = 0.99·v1 + 0.01·Δ² = [0.002475 + 0.0025, 0.000099 + 0.0001] = [0.004975, 0.000199]
    m2, v2 = torch.tensor([0.095, -0.019]), torch.tensor([0.004975, 0.000199])
    torch.testing.assert_close(s.state_dict()["m/w"], m2)
    torch.testing.assert_close(s.state_dict()["v/w"], v2)
    torch.testing.assert_close(x2["w"], x1["w"] + 0.1 * m2 / (v2.sqrt() + 1e-3))


def test_fedyogi_sign_rule_both_ways():
    x = {"w": torch.tensor([0.0, 0.0])}
    delta = {"w": torch.tensor([0.5, 0.5])}  # Δ² = 0.25 for both coordinates
    m, v = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.01])}
    new, m1, v1 = fedyogi_step(x, delta, m, v, lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    # v > Δ²: sign = +1, v ← 1 − 0.01·0.25 = 0.9975 ; v < Δ²: sign = −1, v ← 0.01 + 0.0025 = 0.0125
    torch.testing.assert_close(v1["w"], torch.tensor([0.9975, 0.0125]))
    # m = 0.1·0.5 = 0.05 ; x = 0.05 / (√v + τ)
    torch.testing.assert_close(m1["w"], torch.tensor([0.05, 0.05]))
    torch.testing.assert_close(new["w"], 0.05 / (torch.tensor([0.9975, 0.0125]).sqrt() + 1e-3))
    assert torch.equal(v["w"], torch.tensor([1.0, 0.01]))  # pure: inputs untouched


def test_fedyogi_starts_v_at_tau_squared():
    s = build_strategy("fedyogi", {"tau": 1e-3})
    s.aggregate_fit(1, x0(), round_one())
    # v0 = τ² = 1e-6 < Δ² = [0.25, 0.01] -> v1 = 1e-6 + 0.01·Δ² = [0.0025 + 1e-6, 0.0001 + 1e-6]
    torch.testing.assert_close(s.state_dict()["v/w"], torch.tensor([0.002501, 0.000101]))


def test_fedadagrad_accumulates_squares():
    x = {"w": torch.tensor([0.0, 0.0])}
    d = {"w": torch.tensor([0.5, -0.1])}
    # plain Adagrad (β1 = 0): v1 = Δ² = [0.25, 0.01]; x1 = Δ/(√v1 + τ) = [0.5/0.501, -0.1/0.101]
    x1, m1, v1 = fedadagrad_step(x, d, {}, {}, lr=1.0, beta1=0.0, tau=1e-3)
    torch.testing.assert_close(v1["w"], torch.tensor([0.25, 0.01]))
    torch.testing.assert_close(x1["w"], torch.tensor([0.5 / 0.501, -0.1 / 0.101]))
    # v2 = v1 + Δ² = [0.5, 0.02]; x2 = x1 + Δ/(√v2 + τ)
    x2, _, v2 = fedadagrad_step(x1, d, m1, v1, lr=1.0, beta1=0.0, tau=1e-3)
    torch.testing.assert_close(v2["w"], torch.tensor([0.5, 0.02]))
    expected = x1["w"] + torch.tensor([0.5, -0.1]) / (torch.tensor([0.5, 0.02]).sqrt() + 1e-3)
    torch.testing.assert_close(x2["w"], expected)


def test_fedadagrad_strategy_uses_momentum():
    s = build_strategy("fedadagrad", {"server_lr": 0.1})  # β1 0.9
    x1 = s.aggregate_fit(1, x0(), round_one())
    s.aggregate_fit(2, x1, round_one())
    # m2 = 0.9·(0.1·Δ) + 0.1·Δ = 0.19·Δ = [0.095, -0.019]; v2 = 2·Δ² = [0.5, 0.02]
    torch.testing.assert_close(s.state_dict()["m/w"], torch.tensor([0.095, -0.019]))
    torch.testing.assert_close(s.state_dict()["v/w"], torch.tensor([0.5, 0.02]))


def test_fedavgm_momentum_two_rounds():
    s = build_strategy("fedavgm", {"server_lr": 0.5, "momentum": 0.5})
    x1 = s.aggregate_fit(1, x0(), round_one())
    # v1 = Δ1 = [0.5, -0.1]; x1 = [1, 2] + 0.5·v1 = [1.25, 1.95]
    torch.testing.assert_close(x1["w"], torch.tensor([1.25, 1.95]))
    x2 = s.aggregate_fit(2, x1, round_two())
    # v2 = 0.5·[0.5, -0.1] + [0.3, 0.1] = [0.55, 0.05]; x2 = [1.25, 1.95] + 0.5·v2 = [1.525, 1.975]
    torch.testing.assert_close(s.state_dict()["v/w"], torch.tensor([0.55, 0.05]))
    torch.testing.assert_close(x2["w"], torch.tensor([1.525, 1.975]))


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_fedavgm_without_momentum_is_fedavg(weighting):
    avgm = build_strategy("fedavgm", {"server_lr": 1.0, "momentum": 0.0, "weighting": weighting})
    avg = build_strategy("fedavg", {"weighting": weighting})
    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen).bfloat16()}
    for round_ in (1, 2, 3):
        updates = [ClientUpdate(c, {k: (0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                                    for k, v in state.items()}, n)
                   for c, n in (("x", 2), ("y", 5))]
        got, want = avgm.aggregate_fit(round_, state, updates), avg.aggregate_fit(round_, state, updates)
        for k in state:
            assert torch.equal(got[k], want[k])
        state = want


@pytest.mark.parametrize("name", ["fedavgm", *ADAPTIVE])
def test_state_dict_round_trip_continues_identically(name):
    first = build_strategy(name, {})
    x1 = first.aggregate_fit(1, x0(), round_one())
    resumed = build_strategy(name, {})
    resumed.load_state_dict(first.state_dict())
    assert sorted(resumed.state_dict()) == sorted(first.state_dict())
    a, b = first.aggregate_fit(2, x1, round_two()), resumed.aggregate_fit(2, x1, round_two())
    assert torch.equal(a["w"], b["w"])
    for key, t in first.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[key])


def test_load_state_dict_refuses_unknown_keys():
    s = build_strategy("fedavgm", {})
    with pytest.raises(ValueError, match="m/w"):
        s.load_state_dict({"m/w": torch.zeros(2)})  # FedAvgM keeps only v


@pytest.mark.parametrize("name", ["fedavgm", *ADAPTIVE])
def test_keeps_dtypes(name):
    s = build_strategy(name, {})
    g = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "d": torch.ones(2, dtype=torch.float64)}
    ups = [ClientUpdate("a", {"w": torch.tensor([0.5, -0.5], dtype=torch.bfloat16),
                              "d": torch.full((2,), 0.25, dtype=torch.float64)}, 1)]
    out = s.aggregate_fit(1, g, ups)
    assert out["w"].dtype == torch.bfloat16 and out["d"].dtype == torch.float64
    assert s.state_dict()["v/w"].dtype == torch.float32
    assert s.state_dict()["v/d"].dtype == torch.float64


@pytest.mark.parametrize("name,options,key", [
    ("fedadam", {"beta_1": 0.9}, "beta_1"),
    ("fedyogi", {"tau": 0.0}, "tau"),
    ("fedadagrad", {"beta2": 0.99}, "beta2"),  # Adagrad has no β2
    ("fedavgm", {"momentum": 1.5}, "momentum"),
])
def test_bad_options_fail_with_their_path(name, options, key):
    with pytest.raises(RecipeError, match=f"federation.options.{key}"):
        build_strategy(name, options)
