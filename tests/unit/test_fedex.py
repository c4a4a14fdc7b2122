"""FedEx: θ's exponentiated-gradient step by hand, draws that follow θ, the options and the recipe
check, and every value from the other party checked (the server's index, the clients' losses)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedtune.algorithms import algorithm_options
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.fedex import (
    AFTER,
    BEFORE,
    CONFIG,
    FedEx,
    FedExLocal,
    check_count,
    check_loss,
    check_text,
)
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


# -- each value from the other party: its bounds and the exact refusal -----------------------------


def _refused(check, value, message, **kw):
    with pytest.raises(MessageError, match="^" + re.escape(message) + "$"):
        check(value, "v", **kw)


def test_each_check_accepts_its_bounds_and_names_the_refused_value_exactly():
    """check_count: an int in [0, high]; check_loss: a finite number in [0, 1e4], as a float;
    check_text: 1 to 64 printable characters. A refusal shows the value (its repr up to 40
    characters, else its type and length; an int beyond 1e30 by words: repr() of a huge int may
    fail)."""
    assert check_count(0, "v", high=2) == 0 and check_count(2, "v", high=2) == 2
    for value, shown in ((3, "3"), (-1, "-1"), (True, "True"), (1.0, "1.0"), (None, "None"), (301, "301"),
                         (10**30, "1" + "0" * 30), (10**30 + 1, "an integer beyond 1e30"),
                         (-(10**31), "an integer beyond 1e30"), ("x" * 38, repr("x" * 38)),
                         ("x" * 39, "a str of 41 characters")):
        _refused(check_count, value, f"v must be an integer in [0, 2], got {shown}", high=2)
    assert check_loss(0.0, "v") == 0.0 and check_loss(10_000, "v") == 10_000.0
    assert type(check_loss(1, "v")) is float
    for value, shown in ((-0.5, "-0.5"), (10_000.5, "10000.5"), (math.nan, "nan"), (math.inf, "inf"),
                         (True, "True"), ("1", "'1'"), (None, "None")):
        _refused(check_loss, value, f"v must be a finite loss in [0, 10000], got {shown}")
    assert check_text("a", "v") == "a" and check_text("a" * 64, "v") == "a" * 64
    for value, shown in (("", "''"), ("a" * 65, "a str of 67 characters"), ("a\x00", "'a\\x00'"), (5, "5"),
                         (None, "None")):
        _refused(check_text, value, f"v must be a short printable text, got {shown}")


class _Trainer:
    """Records what it trains with (examples, lr, seed and its section at that moment); the
    training moves the slot's w by −1 and reports fixed figures."""

    def __init__(self, section, slot):
        self.section, self.slot, self.seen = section, slot, []

    def train(self, examples, *, lr, seed):
        self.seen.append((examples, lr, seed, self.section))
        self.slot.w = self.slot.w - 1.0
        return SimpleNamespace(loss=0.75, steps=3, examples=6, seconds=0.5, dp=None)


def _local_fit(local, config, losses, *, lr=0.25):
    """FedExLocal.fit on a one-tensor slot (w = 2) with the validation losses `losses` (before,
    after; a dict is what val_loss returns as is; None: no validation part)."""
    from fedtune.algorithms.base import LocalContext
    from fedtune.config.schema import TrainSection

    section = TrainSection(lr=0.5, local_epochs=2.0, weight_decay=0.0, batch_size=8)
    slot = SimpleNamespace(w=torch.tensor([2.0]))
    slot.get = lambda: {"w": slot.w.clone()}
    trainer = _Trainer(section, slot)
    answers = iter([x if isinstance(x, dict) else {"loss": x, "n_tokens": 9} for x in losses or []])
    val = None if losses is None else (lambda: next(answers))
    meta = {"lr": lr, "fedex": {"config": config, "configs": len(local.configs), "grid": local.digest}}
    ctx = LocalContext("c", 3, 11, lr, slot, trainer, ["e1", "e2"], {}, {}, meta, val)
    outcome = local.fit(ctx, {"w": torch.tensor([2.0])})
    return outcome, trainer, section


def test_the_client_trains_with_the_drawn_configuration_and_reports_both_losses():
    """Configuration 1 of lr {0.1, 0.4} × steps {3} × weight decay {0.25} × batch {2}: lr 0.4 scaled
    by the round's schedule (the round's lr 0.25 over train.lr 0.5), 3 steps instead of 2 epochs,
    weight decay 0.25, batch 2; the section is the recipe's again afterwards."""
    grid = {"train.lr": [0.1, 0.4], "train.local_steps": [3], "train.weight_decay": [0.25],
            "train.batch_size": [2]}
    local = FedExLocal(algorithm_options("fedex", {"grid": grid}))
    outcome, trainer, section = _local_fit(local, 1, [2.5, 1.25])
    [(examples, lr, seed, used)] = trainer.seen
    assert examples == ["e1", "e2"] and lr == 0.2 and seed == 11
    assert used.model_dump() == {**section.model_dump(), "local_steps": 3, "local_epochs": None,
                                 "weight_decay": 0.25, "batch_size": 2}
    assert type(used.local_steps) is int and type(used.batch_size) is int
    assert trainer.section is section
    torch.testing.assert_close(outcome.update["w"], torch.tensor([-1.0]))
    assert outcome.metrics == {"train_loss": 0.75, "steps": 3, "examples_seen": 6, "train_seconds": 0.5,
                               "lr": 0.2, CONFIG: 1, BEFORE: 2.5, AFTER: 1.25}

    # a grid without train.lr: the round's lr as it is; the other keys as the recipe has them
    local = FedExLocal(algorithm_options("fedex", {"grid": {"train.local_steps": [1, 4]}}))
    outcome, trainer, section = _local_fit(local, 0, [2.0, 1.0])
    [(_, lr, _, used)] = trainer.seen
    assert lr == 0.25 and outcome.metrics["lr"] == 0.25
    assert used.model_dump() == {**section.model_dump(), "local_steps": 1, "local_epochs": None}

    # no validation loss on either side (no validation part, or nothing measured): no losses sent
    for losses in (None, [{}, {}], [{}, 1.0], [1.0, {}]):
        outcome, _, _ = _local_fit(local, 1, losses)
        assert outcome.metrics == {"train_loss": 0.75, "steps": 3, "examples_seen": 6,
                                   "train_seconds": 0.5, "lr": 0.25, CONFIG: 1}, losses


GRID3_DIGEST = hashlib.sha256(b'[{"train.lr": 0.001}, {"train.lr": 0.003}, {"train.lr": 0.01}]').hexdigest()[:16]


def test_the_server_draws_each_clients_configuration_by_its_documented_seed():
    """Client c's index in round t: numpy's default_rng(derive_seed(seed, "fedex", t, c)) choosing
    from θ (uniform at first); it travels with the number of configurations and the grid's digest."""
    from fedtune.seeding import derive_seed

    s = FedEx(_options(seed=7))
    clients = [f"c{i}" for i in range(8)]
    meta = s.configure_fit(2, clients, 0.01)
    drawn = {c: int(np.random.default_rng(derive_seed(7, "fedex", 2, c)).choice(3, p=np.full(3, 1 / 3)))
             for c in clients}
    assert sorted(set(drawn.values())) == [0, 1, 2]
    assert meta == {c: {"lr": 0.01, "fedex": {"config": drawn[c], "configs": 3, "grid": GRID3_DIGEST}}
                    for c in clients}
    assert s.assigned == drawn
    assert s.fit_tensors(2, {"w": torch.zeros(2)}) == {} and s.update_specs({"w": None}) == {}


def test_round_metrics_before_and_after_a_step_by_hand():
    """Before any step: θ uniform, entropy ln 3, η 0, no baseline, argmax the first configuration.
    One step (η = 1): a on configuration ja with L = 0.5 − 1 = −0.5, weight 1; b on jb, L = −0.1,
    weight 3 (as test_aggregate_fit_folds_every_reply_and_moves_theta_by_hand)."""
    s = FedEx(_options(eta=1.0))
    third = 1 / 3
    first = s.round_metrics()
    assert set(first) == {"fedex_theta", "fedex_entropy", "fedex_eta", "fedex_baseline", "fedex_feedback",
                          "fedex_exploring", "fedex_best", "fedex_best_config"}
    assert first["fedex_theta"] == pytest.approx([third] * 3, rel=1e-12)
    assert first["fedex_entropy"] == pytest.approx(math.log(3), rel=1e-12)
    assert (first["fedex_eta"], first["fedex_baseline"], first["fedex_feedback"]) == (0.0, None, 0)
    assert first["fedex_exploring"] is True
    assert (first["fedex_best"], first["fedex_best_config"]) == (0, {"train.lr": 1e-3})
    s.configure_fit(1, ["a", "b"], 0.01)
    ja, jb = s.assigned["a"], s.assigned["b"]
    s.aggregate_fit(1, {"w": torch.zeros(2)}, [_update("a", ja, after=0.5, n=1), _update("b", jb, after=0.9, n=3)])
    g = [0.0, 0.0, 0.0]
    g[ja] += 0.25 * (-0.5 + 0.2) * 3
    g[jb] += 0.75 * (-0.1 + 0.2) * 3
    theta = [math.exp(-x) / sum(math.exp(-y) for y in g) for x in g]
    m = s.round_metrics()
    assert m["fedex_theta"] == pytest.approx(theta, rel=1e-9)
    assert m["fedex_entropy"] == pytest.approx(-sum(p * math.log(p) for p in theta), rel=1e-9)
    assert m["fedex_eta"] == 1.0 and m["fedex_baseline"] == pytest.approx(-0.2) and m["fedex_feedback"] == 2
    assert m["fedex_exploring"] is True
    best = max(range(3), key=lambda j: theta[j])
    assert (m["fedex_best"], m["fedex_best_config"]) == (best, {"train.lr": GRID3["train.lr"][best]})
    assert all(type(p) is float for p in m["fedex_theta"])


def test_the_server_refuses_a_bad_reply_with_the_exact_reason():
    s = FedEx(_options())
    with pytest.raises(MessageError, match="^a's reply: FedEx drew no configuration for it this round$"):
        s.feedback(_update("a", 0))                                  # nothing drawn yet
    s.configure_fit(1, ["a"], 0.01)
    j = s.assigned["a"]
    other = (j + 1) % 3
    for update, message in (
            (_update("b", j), "b's reply: FedEx drew no configuration for it this round"),
            (_update("a", other), f"a's reply: metrics.fedex_config is {other}, but the server drew "
                                  f"configuration {j} for it"),
            (_update("a", 3), "a's reply: metrics.fedex_config must be an integer in [0, 2], got 3"),
            (_update("a", None), "a's reply: metrics.fedex_config must be an integer in [0, 2], got None"),
            (_update("a", j, after=-1.0), "a's reply: metrics.fedex_val_after must be a finite loss in "
                                          "[0, 10000], got -1.0"),
            (_update("a", j, before=None), "a's reply: metrics.fedex_val_before must be a finite loss in "
                                           "[0, 10000], got None")):
        with pytest.raises(MessageError, match="^" + re.escape(message) + "$"):
            s.feedback(update)
    # the index may be the last configuration: high is the grid's size − 1
    s.assigned["a"] = 2
    assert s.feedback(_update("a", 2, before=1.5, after=0.25, n=4)) == Feedback(2, -1.25, 4.0)
    # no loss at all: a client without validation examples, nothing to score
    assert s.feedback(_update("a", 2, before=None, after=None)) is None
    # feedback "after": the loss after training alone
    t = FedEx(_options(feedback="after"))
    t.assigned = {"a": 1}
    found = t.feedback(_update("a", 1, before=1.5, after=0.25, n=3))
    assert found == Feedback(1, 0.25, 3.0) and type(found.weight) is float


def test_a_base_without_a_fold_gets_every_checked_reply_at_once():
    """Base median (no streaming fold): the coordinate-wise median of the three updates, added to
    the global state; only the replies with losses move θ, those without are still aggregated."""
    s = FedEx(_options(base="median", eta=1.0))
    s.configure_fit(1, ["a", "b", "c"], 0.01)
    fold = s.fold(1, {"w": torch.tensor([10.0, 10.0])})
    assert fold.base_fold is None
    ups = [ClientUpdate("a", {"w": torch.tensor([1.0, 5.0])}, 1,
                        {CONFIG: s.assigned["a"], BEFORE: 1.0, AFTER: 0.5}),
           ClientUpdate("b", {"w": torch.tensor([2.0, -3.0])}, 1, {CONFIG: s.assigned["b"]}),
           ClientUpdate("c", {"w": torch.tensor([7.0, 0.0])}, 1, {CONFIG: s.assigned["c"]})]
    for u in ups:
        fold.add(u)
        u.tensors = {}   # the server drops each update's tensors once added
    torch.testing.assert_close(fold.finish()["w"], torch.tensor([12.0, 10.0]))
    # one reply with a loss: the baseline is its own loss, so ĝ = 0 and θ stays uniform
    assert s.round_metrics()["fedex_feedback"] == 1 and s.policy.last_baseline == pytest.approx(-0.5)
    np.testing.assert_allclose(s.policy.theta, [1 / 3] * 3, rtol=1e-12)

    # a base that streams (fedavg): each reply folded in as it comes, none kept
    s = FedEx(_options())
    s.configure_fit(1, ["a"], 0.01)
    fold = s.fold(1, {"w": torch.zeros(2)})
    fold.add(_update("a", s.assigned["a"]))
    assert fold.base_fold is not None and fold.kept == []


def test_entropy_and_the_step_sizes_by_hand():
    from fedtune.algorithms.fedex_policy import step_size

    # 0·log 0 = 0: H(½, ¼, ¼, 0) = ½ ln 2 + 2·¼ ln 4 = 1.5 ln 2
    assert entropy(np.array([0.5, 0.25, 0.25, 0.0])) == pytest.approx(1.5 * math.log(2), rel=1e-12)
    assert entropy(np.array([1.0, 0.0])) == 0.0
    grad = np.array([0.5, -0.25])                                   # ‖ĝ‖∞ = 0.5
    assert step_size(2.0, "auto", 4, grad, 0.3) == (1.0, 0.3)       # η₀/√t
    assert step_size(2.0, "constant", 4, grad, 0.3) == (2.0, 0.3)
    assert step_size(2.0, "aggressive", 1, grad, 0.3) == (4.0, 0.3)          # η₀/‖ĝ‖∞
    assert step_size(2.0, "aggressive", 1, np.zeros(2), 0.3) == (2.0, 0.3)    # ĝ = 0: η₀
    assert step_size(2.0, "adaptive", 1, grad, 0.0) == (4.0, 0.25)            # η₀/√(0.5²)
    assert step_size(2.0, "adaptive", 2, grad, 0.75) == (2.0, 1.0)            # η₀/√(0.75 + 0.25)
    assert step_size(2.0, "adaptive", 1, np.zeros(2), 0.0) == (2.0, 0.0)      # nothing summed yet: η₀
    for schedule in ("aggressive", "adaptive"):                               # an empty ĝ has norm 0
        assert step_size(2.0, schedule, 1, np.zeros(0), 0.0) == (2.0, 0.0)
    with pytest.raises(ValueError, match="^" + re.escape("unknown FedEx schedule 'fast'; allowed: auto, "
                                                         "adaptive, aggressive, constant") + "$"):
        step_size(2.0, "fast", 1, grad, 0.0)


def test_the_policy_state_by_hand_and_loaded_as_float64():
    """Before any step: log θ = −ln 3 each, scalars (Σ, weight, store, updates, η, baseline) all 0 but
    the baseline, NaN for none. After one adaptive step with η₀ = 1 from config 0 loss 1 and config 1
    loss 0 (weights 1): λ = 0.5, ĝ = ½·(±0.5)·3 = (0.75, −0.75, 0), store 0.5625, η = 1/0.75."""
    p = Policy(3, eta0=1.0, schedule="adaptive", discount=0.5, cutoff=0.0)
    state = p.state_dict("x/")
    assert set(state) == {"x/log_theta", "x/scalars"}
    assert state["x/log_theta"].dtype == state["x/scalars"].dtype == torch.float64
    torch.testing.assert_close(state["x/log_theta"], torch.full((3,), -math.log(3), dtype=torch.float64))
    assert state["x/scalars"][:5].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0] and math.isnan(state["x/scalars"][5])
    p.update([Feedback(0, 1.0, 1.0), Feedback(1, 0.0, 1.0)])
    scalars = p.state_dict("x/")["x/scalars"].tolist()
    assert scalars == pytest.approx([0.5, 1.0, 0.5625, 1.0, 4 / 3, 0.5], rel=1e-15)
    # a checkpoint in float32 (or written by hand) is read back in float64, its baseline kept
    q = Policy(3, eta0=1.0, schedule="adaptive", discount=0.5, cutoff=0.0)
    q.load_state_dict({k: v.float() for k, v in p.state_dict("x/").items()}, "x/")
    assert q.log_theta.dtype == np.float64 and q.updates == 1 and type(q.updates) is int
    assert q.last_baseline == 0.5 and q.store == 0.5625 and q.base_sum == 0.5 and q.base_weight == 1.0
    assert q.last_eta == pytest.approx(4 / 3, rel=1e-7)
    fresh = Policy(3, eta0=1.0, schedule="adaptive", discount=0.5, cutoff=0.0)
    fresh.load_state_dict(Policy(3, 1.0, "adaptive", 0.5, 0.0).state_dict("x/"), "x/")
    assert fresh.last_baseline is None and fresh.updates == 0
    for bad in ({"x/log_theta": torch.zeros(4, dtype=torch.float64), "x/scalars": torch.zeros(6, dtype=torch.float64)},
                {"x/log_theta": torch.zeros(3, dtype=torch.float64), "x/scalars": torch.zeros(5, dtype=torch.float64)}):
        with pytest.raises(ValueError, match="^" + re.escape(f"FedEx state holds {bad['x/log_theta'].shape[0]} "
                                                             "configurations, the recipe's grid 3") + "$"):
            fresh.load_state_dict(bad, "x/")


def test_draws_are_in_proportion_to_theta_even_unnormalised():
    """A log θ is taken as loaded; the draw normalises θ (weights 0.6 : 0.6 : 0.3 are 0.4, 0.4, 0.2)."""
    p = Policy(3, eta0=1.0, schedule="auto", discount=0.0, cutoff=0.0)
    p.log_theta = np.log(np.array([0.6, 0.6, 0.3]))
    expected = [int(np.random.default_rng(s).choice(3, p=[0.4, 0.4, 0.2])) for s in range(200)]
    assert [p.draw(s) for s in range(200)] == expected
    assert p.best() == 0
    p.log_theta = np.log(np.array([0.2, 0.5, 0.3]))
    assert p.best() == 1
    # exploring while the entropy is at least the cutoff: at the cutoff itself still exploring
    at = Policy(2, eta0=1.0, schedule="auto", discount=0.0, cutoff=entropy(np.array([0.5, 0.5])))
    assert at.exploring() and at.draw(0) == int(np.random.default_rng(0).choice(2, p=[0.5, 0.5]))


def test_the_digest_sorts_the_keys_and_eta0_defaults_to_sqrt_2_ln_k():
    """grid {lr, batch}: the configurations keep the grid's order, the first key varying slowest;
    the digest hashes them as JSON with sorted keys (batch before lr)."""
    c = algorithm_options("fedex", {"grid": {"train.lr": [0.1, 0.2], "train.batch_size": [4, 8, 16]}})
    assert [list(x.items()) for x in c.configurations()[:2]] == [[("train.lr", 0.1), ("train.batch_size", 4)],
                                                               [("train.lr", 0.1), ("train.batch_size", 8)]]
    text = json.dumps([{"train.batch_size": b, "train.lr": lr} for lr in (0.1, 0.2) for b in (4, 8, 16)])
    assert text.startswith('[{"train.batch_size": 4, "train.lr": 0.1}, {"train.batch_size": 8')
    assert c.digest() == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert c.eta0() == pytest.approx(math.sqrt(2 * math.log(6)), rel=1e-12)
    assert algorithm_options("fedex", {"grid": GRID3, "eta": 0.7}).eta0() == 0.7
    assert c.base_options() == {}
    assert algorithm_options("fedex", {"base": "fedadam", "server_lr": 0.5, "beta1": 0.8}).base_options() == \
        {"server_lr": 0.5, "beta1": 0.8}


def _recipe_error(overrides):
    with pytest.raises(RecipeError) as info:
        load_recipe("default", ["federation.algorithm=fedex", *overrides])
    return str(info.value).rsplit("(top level): ", 1)[1]


def test_the_recipe_check_messages_and_what_it_lets_through():
    val = "data.val_fraction=0.1"
    assert _recipe_error(["data.val_fraction=0", "federation.options={grid: {train.lr: [0.001, 0.01]}}"]) == (
        "data.val_fraction: FedEx needs each client's validation part to score its configuration; "
        "set data.val_fraction > 0 (e.g. 0.05)")
    assert _recipe_error([val, "federation.options={grid: {train.batch_size: [2, 4]}}",
                          "train.dp_sgd={noise_multiplier: 0.8}"]) == (
        "federation.options.grid.train.batch_size: DP-SGD's accounting assumes one batch size; "
        "do not vary it with train.dp_sgd")
    assert _recipe_error([val, "federation.options={base: norm_bounding}"]) == (
        "federation.options.max_norm: Field required (options of norm_bounding: max_norm, weighting), "
        "with federation.options.base norm_bounding")
    for ok in (["data.val_fraction=0.02", "federation.options={base: norm_bounding, max_norm: 1.0}"],
               [val, "federation.options={grid: {train.lr: [0.001, 0.01]}}", "train.dp_sgd={noise_multiplier: 0.8}"],
               [val, "federation.options={grid: {train.batch_size: [2, 4]}}"]):
        recipe = load_recipe("default", ["federation.algorithm=fedex", *ok])
        assert recipe.federation.algorithm == "fedex"


def test_the_client_refuses_the_servers_instructions_with_the_exact_reason():
    local = FedExLocal(_options())
    d = local.digest
    mismatch = "meta.fedex: the server's FedEx grid ({} configurations, {}) is not this client's (3, {}); " \
               "both need the same federation.options.grid"
    for entry, message in (
            ({"config": 0, "configs": 10**6 + 1, "grid": d},
             "meta.fedex.configs must be an integer in [0, 1000000], got 1000001"),
            ({"config": 0, "configs": 10**6, "grid": d}, mismatch.format(10**6, d, d)),
            ({"config": 0, "configs": 61, "grid": d}, mismatch.format(61, d, d)),
            ({"config": 0, "configs": 3, "grid": "x" * 65},
             "meta.fedex.grid must be a short printable text, got a str of 67 characters"),
            ({"config": 0, "configs": 3, "grid": "abc"}, mismatch.format(3, "abc", d)),
            ({"config": 3, "configs": 3, "grid": d}, "meta.fedex.config must be an integer in [0, 2], got 3"),
            ("x", "fit message: meta.fedex must be an object with the drawn configuration")):
        with pytest.raises(MessageError, match="^" + re.escape(message) + "$"):
            local.drawn({"fedex": entry})


def test_feedback_without_weight_leaves_the_policy_as_it_was():
    p = Policy(2, eta0=1.0, schedule="auto", discount=0.5, cutoff=0.0)
    for feedback in ([], [Feedback(0, 1.0, 0.0), Feedback(1, 3.0, 0.0)]):
        p.update(feedback)
        assert (p.updates, p.base_sum, p.base_weight, p.last_baseline) == (0, 0.0, 0.0, None)
        np.testing.assert_allclose(p.theta, [0.5, 0.5])


def test_the_wrapper_passes_the_bases_extras_through():
    """Every base FedEx wraps sends nothing beside the adapter and has no personal model."""
    for base in ("fedavg", "fedprox"):
        local = FedExLocal(_options(base=base))
        assert local.server_tensor_specs({"w": ((2,), "float32")}) == {}
        assert local.personal(SimpleNamespace(client="c")) is None
