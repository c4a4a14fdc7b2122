"""Whole rounds of every algorithm -- strategy and client procedure together, through the real server,
clients and codec -- on a two-number model whose local steps are computed by hand (tiny_federation.py).

Clients differ in example counts and answers, so weighting by examples and uniform weighting give
different numbers. Expected values are worked out below with plain floats, from the algorithms'
published update rules, never from fedtune's own functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_federation import LogitModel, LoraLogitModel, federation, recipe, sigmoid

from fedtune.algorithms import available_algorithms, build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.seeding import derive_seed
from fedtune.transport.inprocess import InProcessTransport

# Client data as (token, answer) pairs. Unequal counts; tokens 0 and 1 move w[0] and w[1].
THREE_ONES = [(0, 1)] * 3          # f = 1 on w[0], 3 examples
ONE_ZERO = [(1, 0)]                # f = 0 on w[1], 1 example


def toks(pairs):
    from fedtune.data.prompts import TokenizedExample

    return [TokenizedExample([t, y], [-100, y]) for t, y in pairs]


def grad(w: list[float], pairs) -> list[float]:
    """Mean-loss gradient: per coordinate t, Σ (σ(w_t) − y) over its examples / all examples."""
    g = [0.0] * len(w)
    for t, y in pairs:
        g[t] += (sigmoid(w[t]) - y) / len(pairs)
    return g


def mean_loss(w: list[float], pairs) -> float:
    return sum(math.log1p(math.exp(w[t])) - y * w[t] for t, y in pairs) / len(pairs)


def sgd(w, pairs, lr, steps=1, extra=None):
    """`steps` full-batch SGD steps; `extra(w)` adds to the gradient (proximal term, correction)."""
    w = list(w)
    for _ in range(steps):
        g = grad(w, pairs)
        if extra is not None:
            g = [a + b for a, b in zip(g, extra(w))]
        w = [a - lr * b for a, b in zip(w, g)]
    return w


def wmean(vectors, weights):
    total = sum(weights)
    return [sum(wt * v[i] for v, wt in zip(vectors, weights)) / total for i in range(len(vectors[0]))]


def close(tensor: torch.Tensor, expected, tol=1e-5):
    torch.testing.assert_close(tensor.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=tol)


def run(tmp_path, algorithm, data, *, w0=(0.0, 0.0), rounds=1, model=None, **kw):
    r = recipe(algorithm, len(data), tmp=tmp_path, **kw)
    names = [f"client_{i}" for i in range(len(data))]
    fed = federation(r, model or LogitModel(list(w0)), dict(zip(names, map(toks, data))), tmp=tmp_path)
    for round_ in range(1, rounds + 1):
        fed.round(round_)
    return fed


# -- FedAvg: weighting by examples vs uniform --------------------------------------------------


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_fedavg_round_weights_clients_by_their_example_counts(tmp_path, weighting):
    fed = run(tmp_path, "fedavg", [THREE_ONES, ONE_ZERO], options={"weighting": weighting})
    # client_0: w0 = 0 − (σ(0) − 1) = 0.5; client_1: w1 = 0 − σ(0) = −0.5.
    expected = [3 * 0.5 / 4, -0.5 / 4] if weighting == "examples" else [0.25, -0.25]
    close(fed.server.global_state["w"], expected)
    fits = {e["client"]: e["values"] for e in fed.events("fit")}
    assert fits["client_0"]["n_examples"] == 3 and fits["client_1"]["n_examples"] == 1
    assert fits["client_0"]["train_loss"] == pytest.approx(math.log(2))


def test_fedavg_second_round_starts_from_the_first_rounds_average(tmp_path):
    fed = run(tmp_path, "fedavg", [THREE_ONES, ONE_ZERO], rounds=2, lr=2.0)
    x = [0.0, 0.0]
    for _ in range(2):
        x = wmean([sgd(x, THREE_ONES, 2.0), sgd(x, ONE_ZERO, 2.0)], [3, 1])
    close(fed.server.global_state["w"], x)


# -- FedProx: the proximal gradient μ(w − w_global) -----------------------------------------------


def test_fedprox_round_adds_the_proximal_gradient_at_each_step(tmp_path):
    mu, lr = 0.5, 1.0
    fed = run(tmp_path, "fedprox", [THREE_ONES, ONE_ZERO], options={"mu": mu}, steps=2, lr=lr)
    x = [0.0, 0.0]
    locals_ = [sgd(x, d, lr, 2, extra=lambda w: [mu * (a - b) for a, b in zip(w, x)])
               for d in (THREE_ONES, ONE_ZERO)]
    # client_0 by hand: 0.5, then 0.5 − (σ(0.5) − 1 + 0.25) = 0.6275 (0.8775 without the term)
    assert locals_[0][0] == pytest.approx(0.5 - (sigmoid(0.5) - 1 + 0.25))
    close(fed.server.global_state["w"], wmean(locals_, [3, 1]))
    # The reported train loss is the data loss (no proximal term), averaged over the two steps:
    # client_1 at w1 = 0, then at w1 = −0.5.
    fits = {e["client"]: e["values"] for e in fed.events("fit")}
    assert fits["client_1"]["train_loss"] == pytest.approx((math.log(2) + math.log1p(math.exp(-0.5))) / 2)
    assert fits["client_1"]["steps"] == 2


# -- SCAFFOLD: control variates and the sign of the correction ------------------------------------


def test_scaffold_two_rounds_control_variates_and_correction(tmp_path):
    # Start off zero, so the two clients' pulls on w[0] differ in size: the server's c is then
    # non-zero after round 1 and its sign matters in round 2. lr ≠ 1 tells K·η from K/η.
    lr, k, w0 = 0.5, 2, (0.4, 0.0)
    a, b = THREE_ONES, [(0, 0)]  # both on w[0]: client_1 pulls the other way
    fed = run(tmp_path, "scaffold", [a, b], steps=k, lr=lr, rounds=1, w0=w0)
    x, c = list(w0), [0.0, 0.0]
    ci = {0: [0.0, 0.0], 1: [0.0, 0.0]}
    weights = [3, 1]

    def one_round(x, c, ci):
        ys, dcs = [], []
        for i, data in enumerate((a, b)):
            corr = [cc - cl for cc, cl in zip(c, ci[i])]
            y = sgd(x, data, lr, k, extra=lambda w, corr=corr: corr)
            new_ci = [cl - cc + (xx - yy) / (k * lr) for cl, cc, xx, yy in zip(ci[i], c, x, y)]
            dcs.append([n - o for n, o in zip(new_ci, ci[i])])
            ci[i] = new_ci
            ys.append([yy - xx for yy, xx in zip(y, x)])
        mean = wmean(ys, weights)
        x = [xx + m for xx, m in zip(x, mean)]
        c = [cc + (d0 + d1) / 2 for cc, d0, d1 in zip(c, *dcs)]
        return x, c

    x, c = one_round(x, c, ci)
    close(fed.server.global_state["w"], x)
    close(fed.server.strategy.state_dict()["scaffold/c/w"], c)
    close(fed.clients["client_0"].state["scaffold/ci/w"], ci[0])
    close(fed.clients["client_1"].state["scaffold/ci/w"], ci[1])
    assert abs(c[0]) > 0.01  # the case can tell the sign of c in round 2
    fed.round(2)
    x, c = one_round(x, c, ci)  # now c − c_i ≠ 0: the correction's sign matters
    close(fed.server.global_state["w"], x)
    close(fed.server.strategy.state_dict()["scaffold/c/w"], c)
    close(fed.clients["client_1"].state["scaffold/ci/w"], ci[1])
    close(fed.clients["client_0"].state["scaffold/ci/w"], ci[0])
    # A flipped correction would land elsewhere: check that this case can tell.
    assert abs(ci[0][0]) > 0.05
    fits = {e["client"]: e["values"] for e in fed.events("fit") if e["round"] == 1}
    # client_1's one example (0, 0): loss log(1 + e^w) at w = 0.4, then after one plain step
    # (round 1: c = c_i = 0), at w = 0.4 − 0.5·σ(0.4).
    w_after = 0.4 - lr * sigmoid(0.4)
    assert fits["client_1"]["steps"] == k
    assert fits["client_1"]["train_loss"] == pytest.approx(
        (math.log1p(math.exp(0.4)) + math.log1p(math.exp(w_after))) / 2, rel=1e-5)


# -- server optimisers ------------------------------------------------------------------------------


def _fedopt_expected(rule, rounds, lr_local, hp):
    x = [0.0, 0.0]
    m, v = [0.0, 0.0], None
    for _ in range(rounds):
        d = [a - b for a, b in zip(wmean([sgd(x, THREE_ONES, lr_local), sgd(x, ONE_ZERO, lr_local)],
                                         [3, 1]), x)]
        if rule == "fedavgm":
            m = [hp["momentum"] * mm + dd for mm, dd in zip(m, d)]
            x = [xx + hp["server_lr"] * mm for xx, mm in zip(x, m)]
            continue
        b1, tau = hp["beta1"], hp["tau"]
        m = [b1 * mm + (1 - b1) * dd for mm, dd in zip(m, d)]
        if rule == "fedadam":
            v = [(1 - hp["beta2"]) * dd * dd + hp["beta2"] * (vv if v else 0.0)
                 for dd, vv in zip(d, v or [0.0, 0.0])]
        elif rule == "fedyogi":
            prev = v or [tau * tau] * 2
            v = [vv - (1 - hp["beta2"]) * dd * dd * math.copysign(1, vv - dd * dd) if vv != dd * dd else vv
                 for vv, dd in zip(prev, d)]
        else:  # fedadagrad
            v = [vv + dd * dd for vv, dd in zip(v or [0.0, 0.0], d)]
        x = [xx + hp["server_lr"] * mm / (math.sqrt(vv) + tau) for xx, mm, vv in zip(x, m, v)]
    return x, m, v


@pytest.mark.parametrize("rule,hp", [
    ("fedavgm", {"server_lr": 0.7, "momentum": 0.9}),
    ("fedadam", {"server_lr": 0.1, "beta1": 0.8, "beta2": 0.9, "tau": 0.01}),
    ("fedyogi", {"server_lr": 0.1, "beta1": 0.8, "beta2": 0.9, "tau": 0.01}),
    ("fedadagrad", {"server_lr": 0.1, "beta1": 0.8, "tau": 0.01}),
])
def test_server_optimiser_two_rounds_by_hand(tmp_path, rule, hp):
    fed = run(tmp_path, rule, [THREE_ONES, ONE_ZERO], options=hp, rounds=2, lr=1.0)
    x, m, v = _fedopt_expected(rule, 2, 1.0, hp)
    close(fed.server.global_state["w"], x)
    state = fed.server.strategy.state_dict()
    if rule == "fedavgm":
        close(state["v/w"], m)
    else:
        close(state["m/w"], m)
        close(state["v/w"], v, tol=1e-6)


def test_server_optimiser_uniform_weighting_differs(tmp_path):
    hp = {"server_lr": 1.0, "momentum": 0.0, "weighting": "uniform"}
    fed = run(tmp_path, "fedavgm", [THREE_ONES, ONE_ZERO], options=hp)
    close(fed.server.global_state["w"], [0.25, -0.25])


# -- FlexLoRA ---------------------------------------------------------------------------------------


def test_flexlora_round_averages_the_products_of_the_local_factors(tmp_path):
    model = LoraLogitModel([[1.0, 0.5]], [[1.0]])
    fed = run(tmp_path, "flexlora", [THREE_ONES, ONE_ZERO], model=model)
    # W = B·A = (1, 0.5). dL/dA[0,t] = B·g_t, dL/dB = Σ_t A[0,t]·g_t, one SGD step at rate 1.
    products = []
    for data in (THREE_ONES, ONE_ZERO):
        g = grad([1.0, 0.5], data)
        a = [1.0 - g[0], 0.5 - g[1]]
        b = 1.0 - (1.0 * g[0] + 0.5 * g[1])
        products.append([b * a[0], b * a[1]])
    target = wmean(products, [3, 1])
    state = fed.server.global_state
    a_new, b_new = state["proj.lora_A.default"], state["proj.lora_B.default"]
    close((b_new @ a_new)[0], target)
    # The rank-1 split is balanced: |B| = ‖A‖ = √‖product‖.
    norm = math.hypot(*target)
    assert abs(float(b_new)) == pytest.approx(math.sqrt(norm), rel=1e-5)
    # ... and plain FedAvg of the factors would give another product.
    mean_a = wmean([[1.0 - grad([1.0, 0.5], d)[0], 0.5 - grad([1.0, 0.5], d)[1]]
                    for d in (THREE_ONES, ONE_ZERO)], [3, 1])
    mean_b = wmean([[1.0 - (grad([1.0, 0.5], d)[0] + 0.5 * grad([1.0, 0.5], d)[1])]
                    for d in (THREE_ONES, ONE_ZERO)], [3, 1])[0]
    assert abs(mean_b * mean_a[1] - target[1]) > 1e-3


# -- DP-FedAvg with the noise off -------------------------------------------------------------------


def test_dp_fedavg_without_noise_clips_each_update_and_averages_uniformly(tmp_path):
    quarter = [(1, 1)] + [(1, 0)] * 3  # f = 0.25 on w[1], 4 examples: Δ = (0, −0.25)
    fed = run(tmp_path, "dp_fedavg", [THREE_ONES, quarter],
              options={"clip_norm": 0.3, "noise_multiplier": 0.0})
    # client_0: Δ = (0.5, 0), norm 0.5 > 0.3 -> (0.3, 0); client_1 stays (0, −0.25).
    close(fed.server.global_state["w"], [0.15, -0.125])
    metrics = fed.server.strategy.round_metrics()
    assert metrics["clipped_fraction"] == 0.5
    assert metrics["epsilon"] is None  # no noise: no finite guarantee


# -- robust rules through aggregate_fit ---------------------------------------------------------------


def _updates(values, counts):
    return [ClientUpdate(f"c{i}", {"w": torch.tensor(v)}, n) for i, (v, n) in enumerate(zip(values, counts))]


G = {"w": torch.tensor([1.0, 1.0])}


def test_median_aggregate_fit_ignores_example_counts():
    s = build_strategy("median", {}, 3)
    out = s.aggregate_fit(1, G, _updates([[1.0, 10.0], [2.0, -1.0], [100.0, 0.0]], [1, 1, 1000]))
    close(out["w"], [3.0, 1.0])  # global + (2, 0)
    out = s.aggregate_fit(1, G, _updates([[1.0, 0.0], [2.0, 0.0], [4.0, 1.0], [9.0, 1.0]], [1, 1, 1, 1]))
    close(out["w"], [4.0, 1.5])  # even count: mean of the middle two (3, 0.5)


def test_trimmed_mean_aggregate_fit_drops_the_extremes_per_coordinate():
    s = build_strategy("trimmed_mean", {"trim_ratio": 0.25}, 4)
    ups = _updates([[0.0, 8.0], [1.0, -4.0], [3.0, 2.0], [50.0, 0.0]], [5, 1, 1, 1])
    close(s.aggregate_fit(1, G, ups)["w"], [1.0 + 2.0, 1.0 + 1.0])  # mean(1, 3), mean(0, 2)
    s0 = build_strategy("trimmed_mean", {"trim_ratio": 0.0}, 4)
    close(s0.aggregate_fit(1, G, ups)["w"], [1.0 + 54 / 4, 1.0 + 6 / 4])


def test_krum_aggregate_fit_picks_the_update_closest_to_its_neighbours():
    ups = _updates([[0.0], [1.0], [2.0], [3.0], [100.0]], [1, 1, 3, 1, 1])
    # scores with n − f − 2 = 2 neighbours: 0:1+4, 1:1+1, 2:1+1, 3:1+4, 100: huge -> 1 (earlier tie)
    g = {"w": torch.tensor([10.0])}
    close(build_strategy("krum", {"byzantine": 1}, 5).aggregate_fit(1, g, ups)["w"], [11.0])
    multi = build_strategy("krum", {"byzantine": 1, "multi": 2}, 5)
    close(multi.aggregate_fit(1, g, ups)["w"], [11.5])
    weighted = build_strategy("krum", {"byzantine": 1, "multi": 2, "weighting": "examples"}, 5)
    close(weighted.aggregate_fit(1, g, ups)["w"], [10.0 + (1 + 6) / 4])


def test_krum_min_updates_is_the_larger_of_its_two_needs():
    assert build_strategy("krum", {"byzantine": 1}, 9).min_updates() == 5          # 2f + 3
    assert build_strategy("krum", {"byzantine": 1, "multi": 5}, 9).min_updates() == 6  # multi + f
    assert build_strategy("median", {}, 9).min_updates() == 1


def test_norm_bounding_aggregate_fit_clips_then_weights_by_examples():
    s = build_strategy("norm_bounding", {"max_norm": 1.0}, 2)
    ups = _updates([[3.0, 4.0], [0.3, 0.0]], [1, 3])
    close(s.aggregate_fit(1, {"w": torch.zeros(2)}, ups)["w"], [(0.6 + 0.9) / 4, 0.8 / 4])
    u = build_strategy("norm_bounding", {"max_norm": 1.0, "weighting": "uniform"}, 2)
    close(u.aggregate_fit(1, {"w": torch.zeros(2)}, ups)["w"], [0.45, 0.4])


@pytest.mark.parametrize("rule,options,expected", [
    ("median", {}, [0.5 / 2, -0.5 / 2]),
    ("norm_bounding", {"max_norm": 0.1}, [0.1 * 3 / 4, -0.1 / 4]),
])
def test_robust_rules_in_a_whole_round(tmp_path, rule, options, expected):
    fed = run(tmp_path, rule, [THREE_ONES, ONE_ZERO], options=options)
    close(fed.server.global_state["w"], expected)


# -- FedMeZO: zeroth-order local steps and each signal ------------------------------------------------


def _z(seed: int, n: int = 2) -> list[float]:
    gen = torch.Generator().manual_seed(seed % 2**63)
    return torch.randn((n,), generator=gen, dtype=torch.float32).double().tolist()


def _mezo_client(x, pairs, lr, eps, fit_seed, steps):
    """MeZO by hand: z from derive_seed(fit seed, 'mezo', step); returns (local w, mean loss)."""
    w, losses = list(x), []
    for step in range(steps):
        z = _z(derive_seed(fit_seed, "mezo", step))
        plus = mean_loss([a + eps * b for a, b in zip(w, z)], pairs)
        minus = mean_loss([a - eps * b for a, b in zip(w, z)], pairs)
        g = (plus - minus) / (2 * eps)
        losses.append(0.5 * (plus + minus))
        w = [a - lr * g * b for a, b in zip(w, z)]
    return w, sum(losses) / len(losses)


HALF = [(0, 1), (0, 0)]  # f = 0.5 on w[0], 2 examples


@pytest.mark.parametrize("signal", ["loss", "loss_mean5", "update"])
def test_fedmezo_two_rounds_and_personal_learning_rates(tmp_path, signal):
    data = [THREE_ONES, ONE_ZERO, HALF]
    eps, lr, alpha, steps = 0.01, 1.0, 0.4, 2
    fed = run(tmp_path, "fedmezo", data, options={"eps": eps, "alpha": alpha, "signal": signal},
              steps=steps, lr=lr, rounds=2)
    names = ["client_0", "client_1", "client_2"]
    x, history = [0.0, 0.0], {n: [] for n in names}
    lrs = {n: lr for n in names}
    for round_ in (1, 2):
        outs = {n: _mezo_client(x, d, lrs[n], eps, derive_seed(5, "fit", round_, n), steps)
                for n, d in zip(names, data)}
        new_x = wmean([outs[n][0] for n in names], [3, 1, 2])
        for n in names:
            if signal == "update":
                mean = [a - b for a, b in zip(new_x, x)]
                delta = [a - b for a, b in zip(outs[n][0], x)]
                history[n].append(math.dist(delta, mean))
            else:
                history[n].append(outs[n][1])
        x = new_x
        s = {n: (sum(h) / len(h) if signal == "loss_mean5" else h[-1]) for n, h in history.items()}
        mean_s = sum(s.values()) / 3
        spread = max(abs(v - mean_s) for v in s.values())
        lrs = {n: lr + alpha * (s[n] - mean_s) / spread for n in names}
    close(fed.server.global_state["w"], x, tol=2e-4)
    fits = {e["client"]: e["values"] for e in fed.events("fit") if e["round"] == 2}
    assert [fits[n]["examples_seen"] for n in names] == [steps * 3, steps * 1, steps * 2]
    assert all(fits[n]["steps"] == steps and 0 < fits[n]["train_seconds"] < 60 for n in names)
    assert fits["client_2"]["train_loss"] == pytest.approx(outs["client_2"][1], abs=1e-5)
    assigned = fed.server.strategy.configure_fit(3, names, lr)
    for n in names:
        assert assigned[n]["lr"] == pytest.approx(lrs[n], abs=2e-3)
    assert len({round(v, 6) for v in lrs.values()}) == 3  # the case tells the clients apart


class DecayModel(LogitModel):
    """The logit model plus three tensors the loss never reads, named as a norm scale, a weight
    and a bias: MeZO still perturbs and moves them, and weight decay spares the norm and the bias."""

    def __init__(self):
        super().__init__([0.0, 0.0])
        self.norm_scale = torch.nn.Parameter(torch.tensor([2.0]))
        self.head = torch.nn.Module()
        self.head.weight = torch.nn.Parameter(torch.tensor([3.0]))
        self.head.bias = torch.nn.Parameter(torch.tensor([4.0]))


def test_fedmezo_weight_decay_spares_biases_and_norms(tmp_path):
    # local_epochs 2 on two alike examples at batch size 2: two full-batch MeZO steps.
    eps, lr, decay = 0.01, 0.5, 0.2
    pairs = [(0, 1), (0, 1)]
    fed = run(tmp_path, "fedmezo", [pairs], model=DecayModel(), steps=None, batch_size=2, lr=lr,
              train__local_epochs=2, train__weight_decay=decay, options={"eps": eps})
    theta = {"w": [0.0, 0.0], "norm_scale": [2.0], "head.weight": [3.0], "head.bias": [4.0]}
    fit_seed = derive_seed(5, "fit", 1, "client_0")
    for step in range(2):
        gen = torch.Generator().manual_seed(derive_seed(fit_seed, "mezo", step) % 2**63)
        z = {n: torch.randn((len(v),), generator=gen, dtype=torch.float32).double().tolist()
             for n, v in theta.items()}  # in parameter order
        w = theta["w"]
        plus = mean_loss([a + eps * b for a, b in zip(w, z["w"])], pairs)
        minus = mean_loss([a - eps * b for a, b in zip(w, z["w"])], pairs)
        g = (plus - minus) / (2 * eps)
        for n, v in theta.items():
            keep = 1.0 if n in ("norm_scale", "head.bias") else 1 - lr * decay
            theta[n] = [a * keep - lr * g * b for a, b in zip(v, z[n])]
    for n, v in theta.items():
        close(fed.server.global_state[n], v, tol=1e-4)
    fits = fed.events("fit")
    assert fits[0]["values"]["steps"] == 2 and fits[0]["values"]["examples_seen"] == 4


def test_fedmezo_rate_never_drops_to_zero():
    s = build_strategy("fedmezo", {"alpha": 5.0}, 2)
    g = {"w": torch.zeros(1)}
    s.aggregate_fit(1, g, [ClientUpdate("a", {"w": torch.zeros(1)}, 1, {"train_loss": 1.0}),
                           ClientUpdate("b", {"w": torch.zeros(1)}, 1, {"train_loss": 3.0})])
    lrs = s.configure_fit(2, ["a", "b", "c"], 0.1)
    assert lrs["a"]["lr"] == pytest.approx(1e-4)       # 0.1 − 5 floored at η0/1000
    assert lrs["b"]["lr"] == pytest.approx(5.1)
    assert lrs["c"]["lr"] == pytest.approx(0.1)        # no signal yet: Φ = 0


# -- FedKSeed and FedKSeed-Pro ------------------------------------------------------------------------


def _kseed_expected(data, counts, *, k, eps, lr, steps, round_, pool, probs=None, pool_seed=0,
                    losses=None, clip=None, skipped=None, diffs=None):
    """(new pool, per-client folded vectors) by hand, starting each client from θ(pool);
    `losses` (a dict) receives each client's mean of (L+ + L−)/2 over its steps. `steps` may map
    client -> steps; with `clip`, a step whose |L+ − L−| exceeds it moves nothing (counted in
    `skipped`); `diffs` (a list) receives every |L+ − L−|."""
    zs = [_z(derive_seed(pool_seed, "kseed", j)) for j in range(k)]
    theta0 = [0.0, 0.0]
    start = [t - sum(pool[j] * zs[j][i] for j in range(k)) for i, t in enumerate(theta0)]
    folds = []
    for n, pairs in data.items():
        rng = np.random.default_rng(derive_seed(derive_seed(5, "fit", round_, n), "kseed-sample"))
        w, folded, seen = list(start), [0.0] * k, []
        for _ in range(steps[n] if isinstance(steps, dict) else steps):
            cand = int(rng.choice(k, p=probs)) if probs is not None else int(rng.integers(k))
            z = zs[cand]
            plus = mean_loss([a + eps * b for a, b in zip(w, z)], pairs)
            minus = mean_loss([a - eps * b for a, b in zip(w, z)], pairs)
            g = (plus - minus) / (2 * eps)
            seen.append((plus + minus) / 2)
            if diffs is not None:
                diffs.append(abs(plus - minus))
            if clip is not None and abs(plus - minus) > clip:
                skipped[n] = skipped.get(n, 0) + 1
                continue
            w = [a - lr * g * b for a, b in zip(w, z)]
            folded[cand] += lr * g
        folds.append(folded)
        if losses is not None:
            losses[n] = sum(seen) / len(seen)
    total = sum(counts)
    new_pool = [p + sum(c / total * f[j] for f, c in zip(folds, counts)) for j, p in enumerate(pool)]
    return new_pool, folds, zs


def test_fedkseed_round_moves_the_pool_by_the_weighted_folded_steps(tmp_path):
    k, eps, lr = 3, 0.01, 0.5
    fed = run(tmp_path, "fedkseed", [THREE_ONES, ONE_ZERO], options={"num_seeds": k, "eps": eps},
              steps=3, lr=lr, rounds=2)
    data = {"client_0": THREE_ONES, "client_1": ONE_ZERO}
    pool, _, zs = _kseed_expected(data, [3, 1], k=k, eps=eps, lr=lr, steps=3, round_=1, pool=[0.0] * k)
    losses = {}
    pool, folds, zs = _kseed_expected(data, [3, 1], k=k, eps=eps, lr=lr, steps=3, round_=2, pool=pool,
                                      losses=losses)
    close(fed.server.global_state["kseed/pool"], pool, tol=2e-4)
    fits = {e["client"]: e["values"] for e in fed.events("fit") if e["round"] == 2}
    for (name, pairs), folded in zip(data.items(), folds):
        assert fits[name]["steps"] == 3 and fits[name]["skipped_steps"] == 0
        assert fits[name]["examples_seen"] == 3 * len(pairs)  # full batches of the client's data
        assert fits[name]["seeds_used"] == sum(v != 0 for v in folded)
        assert fits[name]["train_loss"] == pytest.approx(losses[name], abs=1e-5)
    # θ(G) = θ0 − Σ G_k z_k is what a party rebuilds from the pool.
    fed.clients["client_0"].view.load(fed.server.global_state)
    close(fed.model.w.detach(), [-sum(pool[j] * zs[j][i] for j in range(k)) for i in range(2)], tol=2e-4)



def test_fedkseed_skips_steps_whose_loss_difference_exceeds_the_clip(tmp_path):
    # local_epochs 2 at batch size 2: client_0 (3 examples) takes ⌈6/2⌉ = 3 steps on batches of
    # 2, 1, 2 examples; client_1 (1 example) one step. Each client's examples are alike, so a
    # batch's loss depends only on w.
    k, eps, lr = 3, 0.01, 0.5
    data = {"client_0": THREE_ONES, "client_1": ONE_ZERO}
    steps = {"client_0": 3, "client_1": 1}
    clip, skipped, losses, diffs = 0.005, {}, {}, []
    pool, folds, _ = _kseed_expected(data, [3, 1], k=k, eps=eps, lr=lr, steps=steps, round_=1,
                                     pool=[0.0] * k, clip=clip, skipped=skipped, losses=losses, diffs=diffs)
    assert 0 < sum(skipped.values()) < 4
    # Differences just under the clip and up to 4× over it: the case tells |L+ − L−| from a
    # multiple of it.
    assert any(clip / 1.5 < d <= clip for d in diffs) and any(clip < d <= 4 * clip for d in diffs)
    fed = run(tmp_path, "fedkseed", list(data.values()), steps=None, batch_size=2, lr=lr,
              train__local_epochs=2, options={"num_seeds": k, "eps": eps, "loss_diff_clip": clip})
    close(fed.server.global_state["kseed/pool"], pool, tol=2e-4)
    fits = {e["client"]: e["values"] for e in fed.events("fit")}
    for name, folded in zip(data, folds):
        assert fits[name]["steps"] == steps[name]
        assert fits[name]["skipped_steps"] == skipped.get(name, 0)
        assert fits[name]["seeds_used"] == sum(v != 0 for v in folded)
        assert fits[name]["train_loss"] == pytest.approx(losses[name], abs=1e-5)
        assert 0 < fits[name]["train_seconds"] < 60
    assert fits["client_0"]["examples_seen"] == 5 and fits["client_1"]["examples_seen"] == 1


def _pro_probabilities(folds, lr, abs_sum, count):
    """FedKSeed-Pro by hand: fold |g| per candidate into the running sums, then the softmax of
    the min-max-normalised means."""
    for folded in folds:
        for j, v in enumerate(folded):
            if v != 0:
                abs_sum[j] += abs(v / lr)
                count[j] += 1
    mean = [s / c if c else 0.0 for s, c in zip(abs_sum, count)]
    lo, hi = min(mean), max(mean)
    norm = [(m - lo) / (hi - lo) for m in mean]
    return [math.exp(v) / sum(math.exp(u) for u in norm) for v in norm]

def test_fedkseed_pro_learns_candidate_probabilities(tmp_path):
    k, eps, lr = 3, 0.01, 0.5
    fed = run(tmp_path, "fedkseed", [THREE_ONES, ONE_ZERO],
              options={"num_seeds": k, "eps": eps, "pro": True}, steps=2, lr=lr, rounds=2)
    data = {"client_0": THREE_ONES, "client_1": ONE_ZERO}
    uniform = [1 / 3] * 3
    pool, folds, _ = _kseed_expected(data, [3, 1], k=k, eps=eps, lr=lr, steps=2, round_=1,
                                     pool=[0.0] * k, probs=uniform)
    abs_sum, count = [0.0] * k, [0] * k
    probs = _pro_probabilities(folds, lr, abs_sum, count)
    pool, folds2, _ = _kseed_expected(data, [3, 1], k=k, eps=eps, lr=lr, steps=2, round_=2,
                                      pool=pool, probs=probs)
    close(fed.server.global_state["kseed/pool"], pool, tol=2e-4)
    probs = _pro_probabilities(folds2, lr, abs_sum, count)
    close(fed.server.strategy.probabilities(), probs, tol=1e-4)
    assert max(probs) - min(probs) > 0.1


# -- HetLoRA, FLoRA (heterogeneous ranks), FedSP ------------------------------------------------------


def test_hetlora_round_weights_by_product_norm_and_its_regulariser_pulls_the_tail(tmp_path):
    """Rank 2, γ = 0.5: the tail is component 1; λ = 0.1 adds λ·|B₁|·‖A₁‖ to each client's loss."""
    a0, b0 = [[1.0, 0.5], [0.5, -1.0]], [[1.0, 0.5]]
    model = LoraLogitModel(a0, b0)
    lam = 0.1
    fed = run(tmp_path, "hetlora", [THREE_ONES, ONE_ZERO], model=model, adapter={"method": "lora"},
              options={"reg": lam, "gamma": 0.5, "prune": False})
    w = [b0[0][0] * a0[0][t] + b0[0][1] * a0[1][t] for t in (0, 1)]   # W = B·A = (1.25, 0)
    locals_ = []
    for data in (THREE_ONES, ONE_ZERO):
        g = grad(w, data)
        n1 = math.hypot(*a0[1])
        a = [[a0[j][t] - b0[0][j] * g[t] - (lam * abs(b0[0][1]) * a0[1][t] / n1 if j == 1 else 0.0)
              for t in (0, 1)] for j in (0, 1)]
        b = [b0[0][j] - sum(a0[j][t] * g[t] for t in (0, 1)) - (lam * n1 if j == 1 else 0.0)
             for j in (0, 1)]
        product = [b[0] * a[0][t] + b[1] * a[1][t] for t in (0, 1)]
        locals_.append((a, b, math.hypot(*product)))
    weights = [n for _, _, n in locals_]
    state = fed.server.global_state
    close(state["proj.lora_A.default"].flatten(),
          [sum(wt * a[j][t] for (a, _, _), wt in zip(locals_, weights)) / sum(weights)
           for j in (0, 1) for t in (0, 1)])
    close(state["proj.lora_B.default"][0],
          [sum(wt * b[j] for (_, b, _), wt in zip(locals_, weights)) / sum(weights) for j in (0, 1)])


def test_flora_round_stacks_ranks_1_and_2_into_the_global_delta_exactly():
    delta = "down/flora/proj"
    g = {"proj.lora_A.default": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
         "proj.lora_B.default": torch.zeros(1, 2), delta: torch.tensor([[0.5, 0.5]])}
    strategy = build_strategy("flora", {"weighting": "examples"}, 2)
    # client a (rank 1): local A = [[1, 1]], B = [[2]]   -> product (2, 2), 3 examples
    # client b (rank 2): local A = I, B = [[0, 4]]        -> product (0, 4), 1 example
    out = strategy.aggregate_fit(1, g, [
        ClientUpdate("a", {"proj.lora_A.default": torch.tensor([[0.0, 1.0]]),
                           "proj.lora_B.default": torch.tensor([[2.0]])}, 3),
        ClientUpdate("b", {"proj.lora_A.default": torch.zeros(2, 2),
                           "proj.lora_B.default": torch.tensor([[0.0, 4.0]])}, 1)])
    close(out[delta][0], [0.5 + 0.75 * 2 + 0.25 * 0, 0.5 + 0.75 * 2 + 0.25 * 4])
    close(out["proj.lora_B.default"][0], [0.0, 0.0])               # a fresh LoRA for the next round
    close(out["proj.lora_A.default"].flatten(), [1.0, 0.0, 0.0, 1.0])
    assert strategy.round_metrics()["flora_stacked_rank"] == 3


def test_fedsp_round_averages_the_prompts_by_examples():
    strategy = build_strategy("fedsp", {}, 2)
    out = strategy.aggregate_fit(1, {"p": torch.tensor([1.0, 1.0])}, [
        ClientUpdate("a", {"p": torch.tensor([1.0, 0.0])}, 3),
        ClientUpdate("b", {"p": torch.tensor([0.0, 4.0])}, 1)])
    close(out["p"], [1.75, 2.0])   # the clients' auxiliary bodies never reach the server


# -- offsite: FedAvg of the end layers -----------------------------------------------------------------


def test_offsite_round_is_fedavg_of_the_trained_layers(tmp_path):
    from fedtune.algorithms.options import OffsiteConfig, check_offsite

    fed_state = build_strategy("offsite", {"weighting": "examples"}, 2)
    g = {"layer": torch.tensor([1.0, 1.0])}
    out = fed_state.aggregate_fit(1, g, [
        ClientUpdate("a", {"layer": torch.tensor([1.0, 0.0])}, 3),
        ClientUpdate("b", {"layer": torch.tensor([0.0, 4.0])}, 1)])
    close(out["layer"], [1.75, 2.0])
    with pytest.raises(ValueError, match="adapter_bottom"):
        check_offsite(OffsiteConfig(adapter_bottom=0, adapter_top=0), None)


# -- codecs in the flow --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["none", "fp16", "bf16", "int8"])
def test_codecs_round_trip_in_a_round(tmp_path, method):
    lr = 1 / 3
    fed = run(tmp_path, "fedavg", [THREE_ONES, ONE_ZERO], lr=lr,
              federation__compression={"up": {"method": method}, "down": {"method": method}})
    d0, d1 = lr * 0.5, -lr * 0.5  # each client's Δ = ±1/6 on its own coordinate (lr = 1/3)
    if method == "fp16":  # the codec's rounding is visible: 1/6 -> 0.166626
        d0, d1 = float(torch.tensor(d0).half()), float(torch.tensor(d1).half())
        assert abs(d0 - lr * 0.5) > 1e-5
    elif method == "bf16":  # 1/6 -> 0.166992
        d0, d1 = float(torch.tensor(d0).bfloat16()), float(torch.tensor(d1).bfloat16())
        assert abs(d0 - lr * 0.5) > 1e-4
    # int8: one block per tensor, scale max|Δ|/127, so ±1/6 and 0 come back (to float rounding)
    close(fed.server.global_state["w"], [3 * d0 / 4, d1 / 4], tol=1e-7)


def test_topk_up_codec_sends_the_largest_entries_and_keeps_the_rest_as_residual(tmp_path):
    lr = 1.0
    both = [(0, 1), (0, 1), (1, 1)]  # w[0] gets 2/3 of the push, w[1] 1/3
    fed = run(tmp_path, "fedavg", [both], lr=lr,
              federation__compression={"up": {"method": "topk", "topk_ratio": 0.5}})
    g = grad([0.0, 0.0], both)  # (−1/3, −1/6): Δ = (1/3, 1/6); only 1/3 travels
    close(fed.server.global_state["w"], [-g[0], 0.0])
    close(fed.clients["client_0"].state["ef/w"], [0.0, -g[1]])


def test_every_registered_algorithm_has_a_round_test_here():
    import pathlib

    here = pathlib.Path(__file__)
    text = here.read_text() + (here.parent / "test_personalised.py").read_text()  # personalised FL
    missing = [a for a in available_algorithms() if f'"{a}"' not in text]
    assert not missing, f"algorithms without a hand-computed round test: {missing}"
    assert InProcessTransport  # the rounds above go through the real transport


# -- FedEx: each client's lr drawn from θ, θ moved by the validation losses --------------------


def test_fedex_round_trains_each_client_at_its_drawn_lr_and_moves_theta(tmp_path):
    class ValLoss:   # the client's validation loss of the model in the slot: the mean logit loss
        def __init__(self, model):
            self.model = model

        def loss(self, examples):
            w = self.model.w.detach().tolist()
            return {"loss": mean_loss(w, [(e.input_ids[0], e.input_ids[1]) for e in examples])}

    lrs = [0.5, 2.0]
    names = ["client_0", "client_1"]
    # a seed for which the two clients draw different configurations from the uniform θ
    seed = next(s for s in range(50) if len({
        np.random.default_rng(derive_seed(s, "fedex", 1, c)).choice(2, p=[0.5, 0.5]) for c in names}) == 2)
    r = recipe("fedex", 2, tmp=tmp_path, options={"grid": {"train.lr": lrs}, "seed": seed})
    model = LogitModel([0.0, 0.0])
    train = {"client_0": THREE_ONES, "client_1": ONE_ZERO}
    val = {"client_0": [(0, 1), (0, 0)], "client_1": [(1, 0), (1, 0), (1, 1)]}
    fed = federation(r, model, {n: toks(p) for n, p in train.items()}, tmp=tmp_path, evaluator=ValLoss(model))
    for n in names:
        fed.clients[n].data.val = toks(val[n])
    fed.round(1)
    drawn = fed.server.strategy.assigned
    assert sorted(drawn.values()) == [0, 1]
    # each client: one SGD step at its drawn lr; FedAvg by examples (3 and 1)
    local = {n: sgd([0.0, 0.0], train[n], lrs[drawn[n]]) for n in names}
    close(fed.server.global_state["w"], wmean([local[n] for n in names], [3, 1]))
    # θ: L_i = val loss after − before, weights 3/4 and 1/4, λ their mean, ĝ_j = w_i (L_i − λ)/θ_j,
    # η = √(2 ln 2) (auto schedule, first step), θ ∝ ½·exp(−η ĝ)
    losses = {n: mean_loss(local[n], val[n]) - mean_loss([0.0, 0.0], val[n]) for n in names}
    weights = {"client_0": 0.75, "client_1": 0.25}
    lam = sum(weights[n] * losses[n] for n in names)
    g = [0.0, 0.0]
    for n in names:
        g[drawn[n]] += weights[n] * (losses[n] - lam) / 0.5
    eta = math.sqrt(2 * math.log(2))
    un = [0.5 * math.exp(-eta * gj) for gj in g]
    theta = fed.server.strategy.round_metrics()["fedex_theta"]
    assert theta == pytest.approx([u / sum(un) for u in un], rel=1e-5)
    fits = {e["client"]: e["values"] for e in fed.events("fit")}
    assert {n: fits[n]["lr"] for n in names} == {n: lrs[drawn[n]] for n in names}
