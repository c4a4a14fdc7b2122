"""FedEx: θ's exponentiated-gradient step by hand, draws that follow θ, the options and the recipe
check, and every value from the other party checked (the server's index, the clients' losses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtune.algorithms import algorithm_options
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.fedex import AFTER, BEFORE, CONFIG, FedEx, FedExLocal
from fedtune.algorithms.fedex_policy import Feedback, Policy, entropy
from fedtune.config import load_recipe
from fedtune.errors import MessageError, RecipeError

GRID3 = {"train.lr": [1e-3, 3e-3, 1e-2]}


def _options(**kw):
    return algorithm_options("fedex", {"grid": GRID3, **kw})


def test_one_update_by_hand_three_configurations():
    # θ uniform over 3; a: config 0 loss 1 weight 1; b: config 2 loss 3 weight 1; c: config 0 loss 2
    # weight 2. Baseline (discount 0) = this round's weighted mean = (1 + 3 + 4) / 4 = 2.
    # ĝ_0 = (1/4·(1−2) + 2/4·(2−2)) / (1/3) = −0.75; ĝ_1 = 0; ĝ_2 = 1/4·(3−2)·3 = 0.75.
    # auto schedule, t = 1: η = η₀ = 1. θ ∝ (e^0.75, 1, e^−0.75).
    p = Policy(3, eta0=1.0, schedule="auto", discount=0.0, cutoff=0.0)
    p.update([Feedback(0, 1.0, 1.0), Feedback(2, 3.0, 1.0), Feedback(0, 2.0, 2.0)])
    z = math.exp(0.75) + 1 + math.exp(-0.75)
    np.testing.assert_allclose(p.theta, [math.exp(0.75) / z, 1 / z, math.exp(-0.75) / z], rtol=1e-12)
    assert p.last_baseline == pytest.approx(2.0) and p.last_eta == 1.0

    # Round 2, discount 0.5 would weigh round 1's mean by 0.5; with discount 0 the baseline is this
    # round's mean. Here: a alone on config 1, loss 4, so λ = 4 and ĝ = 0: θ is unchanged.
    before = p.theta.copy()
    p.update([Feedback(1, 4.0, 3.0)])
    np.testing.assert_allclose(p.theta, before, rtol=1e-12)


def test_discounted_baseline_and_the_schedules_by_hand():
    # discount 0.5: round 1 mean 2, round 2 mean 1 -> λ_2 = (0.5·2 + 1) / 1.5 = 4/3.
    p = Policy(2, eta0=2.0, schedule="auto", discount=0.5, cutoff=0.0)
    p.update([Feedback(0, 2.0, 1.0), Feedback(1, 2.0, 1.0)])     # λ = 2, ĝ = 0
    np.testing.assert_allclose(p.theta, [0.5, 0.5])
    p.update([Feedback(0, 0.0, 1.0), Feedback(1, 2.0, 1.0)])     # mean 1
    lam = (0.5 * 2 + 1) / 1.5
    g0, g1 = 0.5 * (0.0 - lam) / 0.5, 0.5 * (2.0 - lam) / 0.5
    eta = 2.0 / math.sqrt(2)                                      # auto: η₀/√t, t = 2
    w0, w1 = 0.5 * math.exp(-eta * g0), 0.5 * math.exp(-eta * g1)
    np.testing.assert_allclose(p.theta, [w0 / (w0 + w1), w1 / (w0 + w1)], rtol=1e-12)
    assert p.last_baseline == pytest.approx(lam)

    # adaptive: η = η₀/√(Σ‖ĝ‖∞²); aggressive: η₀/‖ĝ‖∞; constant: η₀. One step from uniform over 2,
    # config 0 loss 0 and config 1 loss 1, equal weights: λ = 0.5, ĝ = (−0.5, 0.5).
    for schedule, eta in (("adaptive", 1 / 0.5), ("aggressive", 1 / 0.5), ("constant", 1.0)):
        q = Policy(2, eta0=1.0, schedule=schedule, discount=0.0, cutoff=0.0)
        q.update([Feedback(0, 0.0, 1.0), Feedback(1, 1.0, 1.0)])
        a, b = math.exp(eta * 0.5), math.exp(-eta * 0.5)
        np.testing.assert_allclose(q.theta, [a / (a + b), b / (a + b)], rtol=1e-12, err_msg=schedule)
        assert q.last_eta == pytest.approx(eta)


def test_draws_follow_theta_and_are_seeded():
    p = Policy(3, eta0=1.0, schedule="auto", discount=0.0, cutoff=0.0)
    p.log_theta = np.log(np.array([0.7, 0.2, 0.1]))
    draws = [p.draw(seed) for seed in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.025)   # ~3.5 standard errors
    assert [p.draw(s) for s in range(50)] == draws[:50]               # the same seeds, the same draws
    # below the entropy cutoff exploration stops: everyone takes argmax θ, and θ no longer moves
    stopped = Policy(3, eta0=1.0, schedule="auto", discount=0.0, cutoff=entropy(np.array([0.7, 0.2, 0.1])) + 1e-9)
    stopped.log_theta = p.log_theta.copy()
    assert not stopped.exploring() and {stopped.draw(s) for s in range(100)} == {0}
    stopped.update([Feedback(0, 5.0, 1.0), Feedback(1, 0.0, 1.0)])
    np.testing.assert_allclose(stopped.theta, [0.7, 0.2, 0.1])


def test_state_round_trips_exactly():
    p = Policy(3, eta0=1.3, schedule="adaptive", discount=0.3, cutoff=0.0)
    p.update([Feedback(0, 1.0, 2.0), Feedback(1, 0.5, 1.0)])
    q = Policy(3, eta0=1.3, schedule="adaptive", discount=0.3, cutoff=0.0)
    q.load_state_dict(p.state_dict("fedex/"), "fedex/")
    for r in (p, q):
        r.update([Feedback(2, 0.1, 1.0), Feedback(0, 0.9, 1.0)])
    assert np.array_equal(p.theta, q.theta) and p.store == q.store and p.updates == q.updates == 2
    with pytest.raises(ValueError, match="configurations"):
        Policy(4, 1.0, "auto", 0.0, 0.0).load_state_dict(p.state_dict("fedex/"), "fedex/")


def test_options_grid_and_base_options():
    c = algorithm_options("fedex", {"base": "fedadam", "server_lr": 0.1,
                                    "grid": {"train.lr": [1e-3, 1e-2], "train.local_steps": [5, 10, 20]}})
    assert c.base_options() == {"server_lr": 0.1}
    configs = c.configurations()
    assert len(configs) == 6 and configs[0] == {"train.lr": 1e-3, "train.local_steps": 5}
    assert configs[5] == {"train.lr": 1e-2, "train.local_steps": 20}
    assert isinstance(configs[0]["train.local_steps"], int)
    assert c.eta0() == pytest.approx(math.sqrt(2 * math.log(6)))
    for bad, words in (({"train.momentum": [0.1, 0.2]}, "grid.train.momentum"),
                       ({"train.lr": [0.0, 0.1]}, "outside"), ({"train.local_steps": [1.5, 2]}, "whole"),
                       ({"train.lr": [0.1]}, "at least two"), ({"train.lr": [0.1, 0.1]}, "twice")):
        with pytest.raises(RecipeError, match=words):
            algorithm_options("fedex", {"grid": bad})


def test_recipe_check_names_the_key():
    base = ["federation.algorithm=fedex", "data.val_fraction=0.1"]
    load_recipe("default", [*base, "federation.options={grid: {train.lr: [0.001, 0.01]}, base: fedadam, server_lr: 0.1}"])
    cases = [
        ("federation.options={grid: {train.lr: [0.001, 0.01]}, base: scaffold}", "federation.options.base"),
        ("federation.options={grid: {train.lr: [0.001, 0.01]}, base: fedadam, server_lrr: 1}",
         "federation.options.server_lrr"),
        ("federation.options={grid: {train.lr: [0.001, 0.01]}, base: fedadam, server_lr: -1}",
         "federation.options.server_lr"),
    ]
    for override, key in cases:
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe("default", [*base, override])
    with pytest.raises(RecipeError, match=r"data\.val_fraction: FedEx needs each client's validation part"):
        load_recipe("default", ["federation.algorithm=fedex", "data.val_fraction=0",
                                "federation.options={grid: {train.lr: [0.001, 0.01]}}"])
    with pytest.raises(RecipeError, match="secure_aggregation"):
        load_recipe("default", [*base, "federation.options={grid: {train.lr: [0.001, 0.01]}}",
                                "federation.secure_aggregation.enabled=true"])


def _update(client, config=None, before=1.0, after=0.5, n=4, **extra):
    metrics = {"train_loss": 1.0, **({} if config is None else {CONFIG: config}),
               BEFORE: before, AFTER: after, **extra}
    return ClientUpdate(client, {"w": torch.ones(2)}, n, metrics)


def test_server_checks_every_feedback_value():
    s = FedEx(_options())
    meta = s.configure_fit(1, ["a", "b"], 0.01)
    j = meta["a"]["fedex"]["config"]
    assert meta["a"]["lr"] == 0.01 and meta["a"]["fedex"]["configs"] == 3
    fold = s.fold(1, {"w": torch.zeros(2)})
    fold.add(_update("a", j))                                       # a good one
    hostile = [
        (_update("a", None), "fedex_config"),                       # no index
        (_update("a", True), "fedex_config"),                       # a bool is no index
        (_update("a", 3), "fedex_config"),                          # out of range
        (_update("a", (j + 1) % 3), "drew"),                         # not the one drawn for it
        (_update("z", 0), "drew no configuration"),                 # not sampled this round
        (_update("a", j, after=-0.1), AFTER),                       # a loss below 0
        (_update("a", j, before=1e9), BEFORE),                      # beyond MAX_LOSS
        (_update("a", j, after="0.5"), AFTER),                      # not a number
        (_update("a", j, after=None), AFTER),                       # one loss without the other
    ]
    for update, words in hostile:
        with pytest.raises(MessageError, match=words):
            fold.add(update)
    state = fold.finish()
    torch.testing.assert_close(state["w"], torch.ones(2))           # only the good update counted
    assert s.round_metrics()["fedex_feedback"] == 1


def test_client_checks_the_servers_instructions():
    local = FedExLocal(_options())
    digest = local.digest
    assert local.drawn({"fedex": {"config": 2, "configs": 3, "grid": digest}}) == 2
    for meta, words in (({}, "meta.fedex"), ({"fedex": [1]}, "meta.fedex"),
                        ({"fedex": {"config": 3, "configs": 3, "grid": digest}}, "config"),
                        ({"fedex": {"config": -1, "configs": 3, "grid": digest}}, "config"),
                        ({"fedex": {"config": 10**400, "configs": 3, "grid": digest}}, "beyond"),
                        ({"fedex": {"config": 0, "configs": 4, "grid": digest}}, "same federation.options.grid"),
                        ({"fedex": {"config": 0, "configs": 3, "grid": "0" * 16}}, "same federation.options.grid"),
                        ({"fedex": {"config": 0, "configs": 3, "grid": "\x00"}}, "printable")):
        with pytest.raises(MessageError, match=words):
            local.drawn(meta)


def test_state_dict_holds_the_base_and_theta():
    s = FedEx(_options(base="fedadam", server_lr=0.1))
    s.configure_fit(1, ["a"], 0.01)
    j = s.assigned["a"]
    fold = s.fold(1, {"w": torch.zeros(2)})
    fold.add(_update("a", j))
    fold.finish()
    state = s.state_dict()
    assert {"fedex/log_theta", "fedex/scalars"} <= set(state) and len(state) > 2   # Adam's moments too
    t = FedEx(_options(base="fedadam", server_lr=0.1))
    t.load_state_dict(state)
    assert np.array_equal(t.policy.theta, s.policy.theta)
    assert all(torch.equal(t.state_dict()[k], v) for k, v in state.items())


def test_the_base_options_are_exactly_those_of_the_bases():
    from fedtune.algorithms.catalog import CATALOG
    from fedtune.algorithms.fedex_options import BASE_KEYS, BASES

    assert set(BASE_KEYS) == {k for b in BASES for k in CATALOG[b].config.model_fields}
    for key in BASE_KEYS:   # each refused for a base that does not have it
        lacking = next(b for b in BASES if key not in CATALOG[b].config.model_fields)
        with pytest.raises(RecipeError, match=rf"federation\.options\.{key}: .*not an option of base {lacking}"):
            algorithm_options("fedex", {"base": lacking, key: 1})
    assert algorithm_options("fedex", {"base": "krum", "byzantine": 0}).base_options() == {"byzantine": 0}
    with pytest.raises(RecipeError, match="max_norm"):   # required by the base: at the recipe check
        load_recipe("default", ["federation.algorithm=fedex", "federation.options={base: norm_bounding}"])


def test_the_grid_digest_is_the_first_16_hex_digits_of_the_configurations_sha256():
    """A client of another fedtune version compares the same fingerprint: the SHA-256 of the
    configurations as sorted-key JSON, cut to 16 hex digits."""
    import hashlib

    c = algorithm_options("fedex", {"grid": {"train.lr": [0.1, 0.2]}})
    text = '[{"train.lr": 0.1}, {"train.lr": 0.2}]'
    assert c.digest() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert len(c.digest()) == 16 and FedExLocal(c).digest == c.digest()


def test_aggregate_fit_folds_every_reply_and_moves_theta_by_hand():
    """Base fedavg (weighted by examples) over a: 1 example, b: 3; θ moved by their losses
    after − before: −0.5 and −0.1, baseline λ = (1·−0.5 + 3·−0.1)/4 = −0.2, η = 1:
    ĝ_j = Σ over j's replies of (n/4)·(L − λ)/(1/3), θ ∝ exp(−ĝ)."""
    s = FedEx(_options(eta=1.0))
    s.configure_fit(1, ["a", "b"], 0.01)
    ja, jb = s.assigned["a"], s.assigned["b"]
    updates = [ClientUpdate("a", {"w": torch.tensor([4.0, 0.0])}, 1,
                            {"train_loss": 1.0, CONFIG: ja, BEFORE: 1.0, AFTER: 0.5}),
               ClientUpdate("b", {"w": torch.tensor([0.0, 4.0])}, 3,
                            {"train_loss": 1.0, CONFIG: jb, BEFORE: 1.0, AFTER: 0.9})]
    state = s.aggregate_fit(1, {"w": torch.zeros(2)}, updates)
    torch.testing.assert_close(state["w"], torch.tensor([1.0, 3.0]))
    g = [0.0, 0.0, 0.0]
    g[ja] += 0.25 * (-0.5 + 0.2) * 3
    g[jb] += 0.75 * (-0.1 + 0.2) * 3
    z = sum(math.exp(-x) for x in g)
    np.testing.assert_allclose(s.policy.theta, [math.exp(-x) / z for x in g], rtol=1e-9)
    assert s.round_metrics()["fedex_feedback"] == 2
