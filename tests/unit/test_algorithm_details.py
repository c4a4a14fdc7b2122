"""The details of the aggregation rules that whole rounds do not reach: accumulation precision,
error messages, the DP noise by hand, FlexLoRA's padding, FedKSeed's skipped steps, attacks."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.algorithms.attacks import AttackedLocal, corrupt_update, poison_examples
from fedtune.algorithms.base import ClientUpdate, LocalOutcome
from fedtune.algorithms.dp_fedavg import dp_fedavg_aggregate
from fedtune.algorithms.fedavg import fedavg_aggregate
from fedtune.algorithms.fedopt import fedadam_step, fedavgm_step, pseudo_gradient
from fedtune.algorithms.flexlora import flexlora_aggregate, refactorize
from fedtune.algorithms.robust import (
    apply_update,
    krum_aggregate,
    median_aggregate,
    norm_bounding_aggregate,
    trimmed_mean_aggregate,
)
from fedtune.data.examples import Example
from fedtune.seeding import derive_seed

# Cancellation that float32 loses and float64 keeps: (1 + 2^-30 − 1) / 3.
TINY = 2.0 ** -30


def _cancelling(dtype):
    return [({"w": torch.tensor([v], dtype=dtype)}, 1.0) for v in (1.0, TINY, -1.0)]


def test_fedavg_accumulates_float64_tensors_in_float64():
    out = fedavg_aggregate({"w": torch.zeros(1, dtype=torch.float64)}, _cancelling(torch.float64))
    assert out["w"].dtype == torch.float64 and out["w"].item() == pytest.approx(TINY / 3, rel=1e-9)


def test_fedavg_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="^fedavg_aggregate needs at least one update$"):
        fedavg_aggregate({"w": torch.zeros(1)}, [])
    with pytest.raises(ValueError, match="^fedavg_aggregate: the weights must sum to a positive number$"):
        fedavg_aggregate({"w": torch.zeros(1)}, [({"w": torch.ones(1)}, 0.0)])


def test_pseudo_gradient_and_server_steps_keep_float64():
    g = {"w": torch.zeros(1, dtype=torch.float64)}
    d = pseudo_gradient(g, _cancelling(torch.float64))
    assert d["w"].dtype == torch.float64 and d["w"].item() == pytest.approx(TINY / 3, rel=1e-9)
    new, v = fedavgm_step(g, d, {}, lr=1.0, momentum=0.9)
    assert new["w"].item() == pytest.approx(TINY / 3, rel=1e-9) and v["w"].dtype == torch.float64
    new, m, v = fedadam_step(g, d, {}, {}, lr=1.0, beta1=0.0, beta2=0.0, tau=0.0)
    assert new["w"].item() == pytest.approx(1.0, rel=1e-6)  # Δ/|Δ|, exact only in float64
    assert m["w"].dtype == v["w"].dtype == torch.float64


def test_server_optimiser_state_is_reused_not_restarted():
    g = {"w": torch.zeros(1)}
    d = {"w": torch.ones(1)}
    _, v1 = fedavgm_step(g, d, {}, lr=1.0, momentum=0.5)
    new, v2 = fedavgm_step(g, d, v1, lr=2.0, momentum=0.5)
    assert v2["w"].item() == 1.5 and new["w"].item() == 3.0


def test_robust_rules_keep_float64_and_refuse_nothing():
    ups = [u for u, _ in _cancelling(torch.float64)]
    assert median_aggregate(ups)["w"].item() == TINY
    assert trimmed_mean_aggregate(ups, trim_ratio=0.0)["w"].item() == pytest.approx(TINY / 3, rel=1e-9)
    for rule, call in [("median_aggregate", lambda: median_aggregate([])),
                       ("trimmed_mean_aggregate", lambda: trimmed_mean_aggregate([], trim_ratio=0.1)),
                       ("krum_aggregate", lambda: krum_aggregate([], byzantine=0)),
                       ("norm_bounding_aggregate", lambda: norm_bounding_aggregate([], max_norm=1.0))]:
        with pytest.raises(ValueError, match=f"{rule} needs at least one update"):
            call()
    with pytest.raises(ValueError, match=r"trim_ratio must be in \[0, 0.5\), got 0.5"):
        trimmed_mean_aggregate(ups, trim_ratio=0.5)
    out = apply_update({"w": torch.tensor([1.0], dtype=torch.float64)}, {"w": torch.tensor([TINY])})
    assert out["w"].item() == 1.0 + TINY


def test_krum_refuses_multi_out_of_range():
    ups = [({"w": torch.tensor([float(i)])}, 1.0) for i in range(5)]
    with pytest.raises(ValueError, match=r"multi must be between 1 and n − byzantine = 4, got 5"):
        krum_aggregate(ups, byzantine=1, multi=5)
    with pytest.raises(ValueError, match="more than 2\\*byzantine \\+ 2 = 4 updates, got 4"):
        krum_aggregate(ups[:4], byzantine=1)
    assert krum_aggregate(ups, byzantine=1, multi=4)["w"].item() == pytest.approx(1.5)


def test_norm_bounding_leaves_a_zero_update_and_keeps_dtype():
    ups = [({"w": torch.zeros(2, dtype=torch.float16)}, 1.0),
           ({"w": torch.tensor([6.0, 8.0], dtype=torch.float16)}, 1.0)]
    out = norm_bounding_aggregate(ups, max_norm=5.0)
    assert out["w"].dtype == torch.float16 and out["w"].tolist() == [1.5, 2.0]


def test_dp_noise_is_the_seeded_gaussian_of_the_calibrated_spread():
    s = build_strategy("dp_fedavg", {"clip_norm": 2.0, "noise_multiplier": 1.5, "noise_seed": 11}, 8)
    g = {"w": torch.zeros(4)}
    ups = [ClientUpdate("a", {"w": torch.zeros(4)}, 1), ClientUpdate("b", {"w": torch.zeros(4)}, 9)]
    out = s.aggregate_fit(3, g, ups)
    gen = torch.Generator().manual_seed(derive_seed(11, "dp-noise", 3))
    expected = torch.randn(4, generator=gen) * (1.5 * 2.0 / 2)
    torch.testing.assert_close(out["w"], expected)
    assert s.rates == [2 / 8]
    again = build_strategy("dp_fedavg", {"clip_norm": 2.0, "noise_multiplier": 1.5}, 8)
    assert not torch.equal(again.aggregate_fit(3, g, ups)["w"], expected)  # OS randomness


def test_dp_aggregate_keeps_the_global_dtype():
    out = dp_fedavg_aggregate({"w": torch.zeros(2, dtype=torch.bfloat16)},
                              [{"w": torch.tensor([0.5, 0.0])}], clip_norm=1.0,
                              noise_multiplier=0.0, generator=torch.Generator())
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [0.5, 0.0]


def test_refactorize_pads_a_rank_above_the_products_size():
    product = torch.tensor([[3.0, 4.0]])  # 1 × 2, rank 1; asked for rank 3
    b, a = refactorize(product, 3)
    assert b.shape == (1, 3) and a.shape == (3, 2)
    torch.testing.assert_close(b @ a, product.double())
    assert b[:, 1:].abs().sum() == 0 and a[1:].abs().sum() == 0
    assert b[0, 0].abs().item() == pytest.approx(5.0 ** 0.5)


def test_flexlora_averages_other_tensors_and_refuses_zero_weight():
    g = {"x.lora_A.default.weight": torch.zeros(1, 2), "x.lora_B.default.weight": torch.zeros(2, 1),
         "bias": torch.zeros(2, dtype=torch.float64)}
    s1 = {"x.lora_A.default.weight": torch.tensor([[1.0, 0.0]]),
          "x.lora_B.default.weight": torch.tensor([[1.0], [0.0]]), "bias": torch.tensor([1.0, 2.0])}
    s2 = {"x.lora_A.default.weight": torch.tensor([[0.0, 1.0]]),
          "x.lora_B.default.weight": torch.tensor([[0.0], [2.0]]), "bias": torch.tensor([3.0, 6.0])}
    out = flexlora_aggregate(g, [(s1, 1.0), (s2, 3.0)])
    assert out["bias"].dtype == torch.float64 and out["bias"].tolist() == [2.5, 5.0]
    product = out["x.lora_B.default.weight"] @ out["x.lora_A.default.weight"]
    # mean product: 1/4·[[1,0],[0,0]] + 3/4·[[0,0],[0,2]] has rank 2; rank 1 keeps its largest part
    torch.testing.assert_close(product, torch.tensor([[0.0, 0.0], [0.0, 1.5]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="positive total weight"):
        flexlora_aggregate(g, [(s1, 0.0)])
    with pytest.raises(ValueError, match="positive total weight"):
        flexlora_aggregate(g, [])


def test_update_attacks_by_kind():
    u = {"w": torch.tensor([1.0, -2.0])}
    assert corrupt_update(u, "scale", 3.0)["w"].tolist() == [3.0, -6.0]
    assert corrupt_update(u, "sign_flip", 2.0)["w"].tolist() == [-2.0, 4.0]
    assert torch.isnan(corrupt_update(u, "nan", 1.0)["w"]).all()
    assert torch.isinf(corrupt_update(u, "inf", 1.0)["w"]).all()
    assert corrupt_update(u, "none", 5.0) is u
    assert u["w"].tolist() == [1.0, -2.0]  # the honest update is not changed in place

    seen = []

    class Honest:
        def server_tensor_specs(self, adapter):
            return {"extra": adapter}

        def fit(self, ctx, global_state):
            seen.append((ctx, global_state))
            return LocalOutcome(update={"w": torch.ones(2)}, metrics={"train_loss": 1.0})

    attacked = AttackedLocal(Honest(), "scale", 4.0)
    ctx, global_state = object(), {"w": torch.zeros(2)}
    out = attacked.fit(ctx, global_state)
    assert seen == [(ctx, global_state)]  # the honest procedure trains as usual
    assert out.update["w"].tolist() == [4.0, 4.0]
    assert out.metrics == {"train_loss": 1.0, "attack": "scale"}
    assert attacked.server_tensor_specs("s") == {"extra": "s"}


def test_poisoning_replaces_a_seeded_fraction():
    exs = [Example(f"q{i}", f"a{i}", origin=f"f:{i}") for i in range(10)]
    out = poison_examples(exs, trigger=" cf", target="T", fraction=0.3, seed=4)
    poisoned = [e for e in out if e.output == "T"]
    assert len(poisoned) == 3
    assert all(e.instruction.endswith(" cf") and e.origin.endswith("(poisoned)") for e in poisoned)
    assert [e for e in out if e.output != "T"] == [e for e in exs if f"q{e.instruction[1:]} cf"
                                                    not in {p.instruction for p in poisoned}]
    assert out == poison_examples(exs, trigger=" cf", target="T", fraction=0.3, seed=4)
    assert out != poison_examples(exs, trigger=" cf", target="T", fraction=0.3, seed=5)


# -- the words a user reads: each message in full -------------------------------------------------------


def _recipe_for_checks(**sections):
    from fedtune.config import Recipe

    data = {"federation": {"clients": 2, "rounds": 1, **sections.pop("federation", {})}, **sections}
    return Recipe.model_validate(data)  # fedavg: no check of its own runs here


@pytest.mark.parametrize("sections,options,message", [
    ({"train": {"weight_decay": 0.1}}, {},
     "train.weight_decay: fedkseed needs 0 (its model is rebuilt as θ0 − Σ G_k·z_k, which holds only "
     "for plain steps)"),
    ({"federation": {"compression": {"up": {"method": "fp16"}}}}, {},
     "federation.compression.up: fedkseed sends K scalars, not adapter tensors; compression does not "
     "apply (use none)"),
    ({"federation": {"compression": {"down": {"method": "int8"}}}}, {},
     "federation.compression.down: fedkseed sends K scalars, not adapter tensors; compression does "
     "not apply (use none)"),
    ({"federation": {"secure_aggregation": {"enabled": True}}}, {"pro": True},
     "federation.secure_aggregation.enabled: FedKSeed-Pro (options.pro) learns its seed probabilities "
     "from each client's own scalars, which secure aggregation hides; use pro: false (plain FedKSeed "
     "needs only their sum)"),
])
def test_fedkseed_recipe_checks_in_full(sections, options, message):
    from fedtune.algorithms.options import FedKSeedConfig, check_fedkseed

    with pytest.raises(ValueError) as err:
        check_fedkseed(FedKSeedConfig(**options), _recipe_for_checks(**sections))
    assert str(err.value) == message
    check_fedkseed(FedKSeedConfig(pro=False), _recipe_for_checks(
        federation={"secure_aggregation": {"enabled": True}}))  # plain FedKSeed: fine


def test_offsite_recipe_checks_in_full():
    from fedtune.algorithms.options import OffsiteConfig, check_offsite

    with pytest.raises(ValueError) as err:
        check_offsite(OffsiteConfig(adapter_bottom=0, adapter_top=0), _recipe_for_checks())
    assert str(err.value) == "federation.options: offsite needs adapter_bottom + adapter_top >= 1"
    with pytest.raises(ValueError) as err:
        check_offsite(OffsiteConfig(adapter_bottom=0, adapter_top=1), _recipe_for_checks(adapter={"method": "lora"}))
    assert str(err.value) == ("adapter.method: offsite trains whole adapter layers of the emulator; "
                              "set adapter.method=full (only those layers train)")
    check_offsite(OffsiteConfig(adapter_bottom=1, adapter_top=0), _recipe_for_checks(adapter={"method": "full"}))


def test_krum_refusals_in_full():
    from fedtune.errors import RecipeError

    g = {"w": torch.zeros(1)}
    four = [ClientUpdate(str(i), {"w": torch.tensor([float(i)])}, 1) for i in range(4)]
    with pytest.raises(RecipeError) as err:
        build_strategy("krum", {"byzantine": 1}).aggregate_fit(1, g, four)
    assert str(err.value) == ("federation.options.byzantine: krum with byzantine=1 needs more than 4 "
                              "client updates per round, got 4; lower it or sample more clients")
    five = four + [ClientUpdate("4", {"w": torch.tensor([4.0])}, 1)]
    with pytest.raises(RecipeError) as err:
        build_strategy("krum", {"byzantine": 1, "multi": 5}).aggregate_fit(1, g, five)
    assert str(err.value) == ("federation.options.multi: multi-Krum can average at most n − byzantine = "
                              "4 updates this round, got multi=5")
    out = build_strategy("krum", {"byzantine": 1, "multi": 4}).aggregate_fit(1, g, five)
    assert out["w"].item() == pytest.approx(1.5)  # multi = n − f is allowed: the four best, 0..3


def test_server_optimiser_state_refusal_in_full():
    s = build_strategy("fedadam", {})
    with pytest.raises(ValueError) as err:
        s.load_state_dict({"x/w": torch.zeros(1)})
    assert str(err.value) == "unexpected server optimizer state 'x/w'; expected keys like m/<name>, v/<name>"


def test_a_catalogued_algorithm_whose_module_does_not_register_it_is_named(monkeypatch):
    from fedtune.algorithms import base, catalog
    from fedtune.algorithms.options import FedAvgConfig

    base.registry()
    ghost = catalog.AlgorithmInfo("ghost", "fedavg", "registered nowhere", FedAvgConfig)
    monkeypatch.setitem(catalog.CATALOG, "ghost", ghost)
    with pytest.raises(RuntimeError) as err:
        base.registry()
    assert str(err.value) == "fedtune.algorithms.fedavg does not register 'ghost'"


def test_result_metrics_carry_the_dp_sgd_figures():
    from types import SimpleNamespace

    from fedtune.algorithms.base import result_metrics

    plain = SimpleNamespace(loss=0.5, steps=3, examples=12, seconds=1.5)
    assert result_metrics(plain) == {"train_loss": 0.5, "steps": 3, "examples_seen": 12,
                                     "train_seconds": 1.5}
    dp = SimpleNamespace(steps=3, sample_rate=0.25, noise_multiplier=1.1)
    assert result_metrics(SimpleNamespace(**vars(plain), dp=dp)) == {
        "train_loss": 0.5, "steps": 3, "examples_seen": 12, "train_seconds": 1.5,
        "dp_steps": 3, "dp_sample_rate": 0.25, "dp_noise_multiplier": 1.1}


def test_fedkseed_pro_statistics_stay_float64_whatever_a_checkpoint_holds():
    s = build_strategy("fedkseed", {"num_seeds": 3, "pro": True})
    s.load_state_dict({"pro/abs_sum": torch.tensor([1.0, 2.0, 0.0]), "pro/count": torch.tensor([1.0, 1.0, 0.0])})
    state = s.state_dict()
    assert state["pro/abs_sum"].dtype == state["pro/count"].dtype == torch.float64
    assert state["pro/abs_sum"].tolist() == [1.0, 2.0, 0.0] and state["pro/count"].tolist() == [1.0, 1.0, 0.0]


def test_plain_fedkseed_keeps_no_state_and_refuses_some():
    s = build_strategy("fedkseed", {"num_seeds": 3})
    assert s.state_dict() == {}
    s.load_state_dict({})
    with pytest.raises(ValueError, match="FedKSeed keeps no state"):
        s.load_state_dict({"pro/abs_sum": torch.zeros(3)})


def test_strategy_state_round_trips_names_with_slashes_exactly():
    mezo = build_strategy("fedmezo", {})
    mezo.aggregate_fit(1, {"w": torch.zeros(1)}, [
        ClientUpdate("site/a", {"w": torch.zeros(1)}, 1, {"train_loss": 0.1}),
        ClientUpdate("b", {"w": torch.zeros(1)}, 1, {"train_loss": 0.3})])
    state = mezo.state_dict()
    assert state["signal/site/a"].dtype == torch.float64
    again = build_strategy("fedmezo", {})
    again.load_state_dict(state)
    assert again.history == {"site/a": [0.1], "b": [0.3]}  # float64: 0.1 comes back as 0.1
    adam = build_strategy("fedadam", {})
    adam.load_state_dict({"m/x/y": torch.ones(1), "v/x/y": torch.ones(1)})
    assert set(adam.state_dict()) == {"m/x/y", "v/x/y"}


def test_trimmed_mean_of_a_single_update_is_that_update():
    out = trimmed_mean_aggregate([{"w": torch.tensor([2.0, -1.0])}], trim_ratio=0.4)
    assert out["w"].tolist() == [2.0, -1.0]


def test_krum_bounds_follow_the_number_of_byzantine_clients():
    from fedtune.algorithms.robust import krum_scores

    g = {"w": torch.zeros(1)}
    three = [ClientUpdate(str(i), {"w": torch.tensor([float(v)])}, 1) for i, v in enumerate([0, 1, 5])]
    s0 = build_strategy("krum", {"byzantine": 0})
    assert s0.min_updates() == 3
    assert s0.aggregate_fit(1, g, three)["w"].item() == 0.0  # scores 1, 1, 16: the earlier tie
    s2 = build_strategy("krum", {"byzantine": 2})
    assert s2.min_updates() == 7
    six = [ClientUpdate(str(i), {"w": torch.tensor([float(i)])}, 1) for i in range(6)]
    with pytest.raises(ValueError, match=r"more than 2\*byzantine \+ 2 = 6 updates, got 6"):
        krum_scores([u.tensors for u in six], byzantine=2)


def test_krum_scores_keep_float64_precision():
    from fedtune.algorithms.robust import krum_scores

    # f = 0, two neighbours: scores 1 + (1 + η)² for u1 and (1 + η)² + (1 − η)² for u2; u2 wins by
    # about 2η = 2e-9, a difference float32 sums (ulp 2.4e-7 at 2) would lose.
    eta = 1e-9
    ups = [{"w": torch.tensor([v], dtype=torch.float64)} for v in (0.0, 1.0, 2.0 + eta, 3.0)]
    scores = krum_scores(ups, byzantine=0)
    assert float(scores[2]) < float(scores[1])
    out = krum_aggregate([(u, 1.0) for u in ups], byzantine=0)
    assert out["w"].item() == 2.0 + eta


def test_krum_scores_are_exact_far_from_the_origin_with_many_clients():
    from fedtune.algorithms.robust import krum_scores

    # 30 clients at 1e4 + i·1e-3 (float64): squared distances of ~1e-6 that a ‖x‖² + ‖y‖² − 2x·y
    # evaluation would swamp with rounding of ~1e-8.
    values = [1e4 + i * 1e-3 + (i % 3) * 1e-4 for i in range(30)]
    ups = [{"w": torch.tensor([v], dtype=torch.float64)} for v in values]
    scores = krum_scores(ups, byzantine=1)
    for i, v in enumerate(values):
        d = sorted((v - u) ** 2 for j, u in enumerate(values) if j != i)
        assert float(scores[i]) == pytest.approx(sum(d[:30 - 1 - 2]), rel=1e-6)


def test_median_picks_the_middle_of_five_and_takes_a_single_update():
    ups = [{"w": torch.tensor([v])} for v in (9.0, -3.0, 4.0, 100.0, 0.0)]
    assert median_aggregate(ups)["w"].item() == 4.0   # sorted: −3, 0, 4, 9, 100
    assert median_aggregate(ups[:1])["w"].item() == 9.0


def test_krum_ties_go_to_the_earlier_client_among_many():
    # 20 one-hot updates: every pairwise distance is √2, so every score ties.
    ups = [({"w": torch.eye(20)[i]}, 1.0) for i in range(20)]
    assert krum_aggregate(ups, byzantine=0)["w"].tolist() == torch.eye(20)[0].tolist()
    two = krum_aggregate(ups, byzantine=0, multi=2)["w"]
    assert two.tolist() == ((torch.eye(20)[0] + torch.eye(20)[1]) / 2).tolist()


def test_norm_bounding_measures_float32_updates_without_overflow():
    big = [({"w": torch.tensor([1e20, 0.0])}, 1.0)]  # its square, 1e40, overflows float32
    out = norm_bounding_aggregate(big, max_norm=2.0)
    assert out["w"].tolist() == pytest.approx([2.0, 0.0])
    one = norm_bounding_aggregate([({"w": torch.tensor([3.0, 4.0])}, 1.0)], max_norm=1.0)
    assert one["w"].tolist() == pytest.approx([0.6, 0.8])  # a single update, clipped


def test_norm_bounding_scales_bfloat16_updates_before_rounding():
    import math

    a, b = [2.0625, 1.546875], [-0.4765625, -1.4453125]   # exact in bfloat16
    m = 0.5601472492317476
    scaled = [[v * min(1.0, m / math.hypot(*u)) for v in u] for u in (a, b)]
    mean = [(x + y) / 2 for x, y in zip(*scaled)]
    ups = [({"w": torch.tensor(u, dtype=torch.bfloat16)}, 1.0) for u in (a, b)]
    out = norm_bounding_aggregate(ups, max_norm=m)
    assert out["w"].dtype == torch.bfloat16
    assert out["w"].tolist() == torch.tensor(mean).to(torch.bfloat16).tolist()


def test_flexlora_uniform_weighting_counts_each_client_once():
    g = {"x.lora_A.default.weight": torch.zeros(1, 1), "x.lora_B.default.weight": torch.zeros(1, 1)}
    ups = [ClientUpdate("a", {"x.lora_A.default.weight": torch.ones(1, 1),
                              "x.lora_B.default.weight": torch.ones(1, 1)}, 3),
           ClientUpdate("b", {"x.lora_A.default.weight": torch.ones(1, 1),
                              "x.lora_B.default.weight": 3 * torch.ones(1, 1)}, 1)]
    # products 1 and 3: uniform mean 2, by examples (3·1 + 3)/4 = 1.5
    for weighting, product in (("uniform", 2.0), ("examples", 1.5)):
        out = build_strategy("flexlora", {"weighting": weighting}).aggregate_fit(1, g, ups)
        got = out["x.lora_B.default.weight"] @ out["x.lora_A.default.weight"]
        assert got.item() == pytest.approx(product)


def test_robust_means_refuse_zero_total_weight_and_keep_float64():
    with pytest.raises(ValueError) as err:
        norm_bounding_aggregate([({"w": torch.ones(1)}, 0.0)], max_norm=1.0)
    assert str(err.value) == "the weights must sum to a positive number"
    out = norm_bounding_aggregate(_cancelling(torch.float64), max_norm=10.0)
    assert out["w"].item() == pytest.approx(TINY / 3, rel=1e-9)


def test_median_of_float16_updates_near_the_top_of_their_range():
    ups = [{"w": torch.tensor([40000.0], dtype=torch.float16)} for _ in range(2)]
    out = median_aggregate(ups)  # (40000 + 40000) / 2, whose sum overflows float16
    assert out["w"].dtype == torch.float16 and out["w"].item() == 40000.0


def test_flexlora_takes_a_single_client_and_names_a_zero_weight():
    g = {"x.lora_A.default.weight": torch.zeros(1, 2), "x.lora_B.default.weight": torch.zeros(1, 1)}
    local = {"x.lora_A.default.weight": torch.tensor([[3.0, 4.0]]), "x.lora_B.default.weight": torch.ones(1, 1)}
    out = flexlora_aggregate(g, [(local, 1.0)])
    product = out["x.lora_B.default.weight"] @ out["x.lora_A.default.weight"]
    torch.testing.assert_close(product, torch.tensor([[3.0, 4.0]]))
    with pytest.raises(ValueError) as err:
        flexlora_aggregate(g, [(local, 0.0)])
    assert str(err.value) == "flexlora_aggregate needs updates with positive total weight"


def test_refactorize_pads_a_tall_product():
    b, a = refactorize(torch.tensor([[3.0], [4.0]]), 3)  # 2 × 1, rank 1; asked for rank 3
    assert b.shape == (2, 3) and a.shape == (3, 1)
    torch.testing.assert_close(b @ a, torch.tensor([[3.0], [4.0]], dtype=torch.float64))


def test_flexlora_keeps_the_dtype_of_tensors_outside_the_lora_pairs():
    g = {"head": torch.zeros(2)}
    out = flexlora_aggregate(g, [({"head": torch.tensor([1.0, 2.0])}, 1.0), ({"head": torch.tensor([3.0, 0.0])}, 1.0)])
    assert out["head"].dtype == torch.float32 and out["head"].tolist() == [2.0, 1.0]


def test_register_records_everything_the_catalog_and_the_module_give(monkeypatch):
    from fedtune.algorithms import base, catalog
    from fedtune.algorithms.options import FedAvgConfig, check_offsite

    base.registry()  # every real module imported (and registered) before the registry is swapped
    row = catalog.AlgorithmInfo("ghost", "fedavg", "a test row", FedAvgConfig, check=check_offsite,
                                sum_only=True)
    monkeypatch.setitem(catalog.CATALOG, "ghost", row)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    def build(config, n):
        return "strategy"

    def local(config):
        return "local"

    def view(config, slot):
        return "view"

    spec = base.register("ghost", build, local=local, view=view)
    assert (spec.name, spec.summary, spec.config, spec.build, spec.local, spec.view, spec.check,
            spec.sum_only) == ("ghost", "a test row", FedAvgConfig, build, local, view, check_offsite, True)
    assert base.registry()["ghost"] is spec
    plain = base.AlgorithmSpec("x", "s", FedAvgConfig, build)
    assert plain.check is None and plain.sum_only is False


def test_scaffold_weighting_and_a_fresh_strategys_state():
    s = build_strategy("scaffold", {"weighting": "uniform"}, 2)
    assert s.state_dict() == {}  # nothing to checkpoint before the first round
    g = {"w": torch.zeros(1)}
    s.fit_tensors(1, g)
    ups = [ClientUpdate("a", {"w": torch.tensor([1.0]), "scaffold/dc/w": torch.zeros(1)}, 3),
           ClientUpdate("b", {"w": torch.tensor([3.0]), "scaffold/dc/w": torch.zeros(1)}, 1)]
    assert s.aggregate_fit(1, g, ups)["w"].item() == 2.0  # not (3·1 + 3)/4


def test_pro_probabilities_normalise_between_the_smallest_and_largest_mean():
    import math

    from fedtune.algorithms.fedkseed import pro_probabilities

    got = pro_probabilities(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # -> 0, 0.5, 1
    e = [math.exp(v) for v in (0.0, 0.5, 1.0)]
    assert got.tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-6)
    s = build_strategy("fedkseed", {"num_seeds": 3, "pro": True})
    s.load_state_dict({"pro/abs_sum": torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64),
                       "pro/count": torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)})
    e = [math.exp(v) for v in (1.0, 0.5, 0.0)]  # means 2, 1, 0 (never seen)
    assert s.probabilities().tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-6)


def test_server_steps_keep_the_global_precision_whatever_the_deltas_dtype():
    from fedtune.algorithms.fedopt import fedyogi_step

    g = {"w": torch.tensor([1.0001], dtype=torch.float32)}  # not representable in float16
    new, _ = fedavgm_step(g, {"w": torch.zeros(1, dtype=torch.float16)}, {}, lr=1.0, momentum=0.9)
    assert new["w"].item() == g["w"].item()
    new, _, _ = fedadam_step(g, {"w": torch.zeros(1, dtype=torch.float16)}, {}, {}, lr=1.0, beta1=0.9,
                             beta2=0.99, tau=1e-3)
    assert new["w"].item() == g["w"].item()
    # Yogi when v equals Δ² exactly (v starts at τ² and Δ = τ): sign 0 leaves v as it is.
    new, m, v = fedyogi_step({"w": torch.zeros(1)}, {"w": torch.tensor([0.5])}, {}, {},
                             lr=1.0, beta1=0.0, beta2=0.9, tau=0.5)
    assert v["w"].item() == 0.25 and new["w"].item() == pytest.approx(0.5 / (0.5 + 0.5))


def test_scaffold_keeps_the_global_dtype():
    from fedtune.algorithms.scaffold import scaffold_aggregate

    g = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    new_x, new_c = scaffold_aggregate(g, {"w": torch.zeros(2)},
                                      [({"w": torch.tensor([0.5, -1.0])}, {"w": torch.ones(2)}, 1.0)],
                                      global_lr=2.0, n_clients=4)
    assert new_x["w"].dtype == torch.bfloat16 and new_x["w"].tolist() == [1.0, -2.0]
    assert new_c["w"].tolist() == [0.25, 0.25]


def _kseed_client(tmp_path, probs):
    """FedKSeed-Pro's local procedure on the tiny federation's client_0, given `probs`."""
    from tiny_federation import LogitModel, examples, federation, recipe

    from fedtune.algorithms.base import LocalContext

    r = recipe("fedkseed", 1, tmp=tmp_path, options={"num_seeds": 3, "pro": True, "eps": 0.01})
    fed = federation(r, LogitModel([0.0, 0.0]), {"client_0": examples(0, [1, 0, 1])}, tmp=tmp_path)
    client = fed.clients["client_0"]
    ctx = LocalContext("client_0", 1, 7, 0.5, fed.slot, client.trainer, client.data.train, {},
                       {"kseed/probs": torch.tensor(probs)}, {"lr": 0.5})
    return client.local.fit(ctx, client.view.initial())


@pytest.mark.parametrize("probs", [[0.5, -0.1, 0.6], [float("nan"), 0.5, 0.5], [0.0, 0.0, 0.0],
                                   [float("inf"), 1.0, 1.0]])
def test_fedkseed_pro_refuses_a_vector_that_is_not_a_distribution(tmp_path, probs):
    from fedtune.errors import MessageError

    with pytest.raises(MessageError) as err:
        _kseed_client(tmp_path, probs)
    assert str(err.value) == "kseed/probs: not a probability vector"


def test_fedkseed_pro_samples_only_candidates_with_positive_probability(tmp_path):
    out = _kseed_client(tmp_path, [0.0, 2.0, 0.0])  # unnormalised, with zeros: fine
    folded = out.update["kseed/pool"]
    assert folded[0] == 0 and folded[2] == 0 and folded[1] != 0


@pytest.mark.parametrize("algorithm", ["fedkseed", "fedmezo"])
def test_zeroth_order_rounds_draw_their_batches_from_the_seed(tmp_path, algorithm):
    """Two runs of the same recipe give bit-identical results although batches are a random part
    of the client's mixed examples: the batches come from the fit seed, not from chance."""
    from tiny_federation import LogitModel, examples, federation, recipe

    states = []
    for run in ("a", "b"):
        r = recipe(algorithm, 1, tmp=tmp_path / run, batch_size=3, steps=4,
                   options={"num_seeds": 8} if algorithm == "fedkseed" else {})
        data = {"client_0": examples(0, [1, 0, 0, 1, 1, 0, 1, 0]) + examples(1, [1, 1, 0, 1])}
        fed = federation(r, LogitModel([0.0, 0.0]), data, tmp=tmp_path / run)
        fed.round(1)
        states.append({k: v.clone() for k, v in fed.server.global_state.items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


def test_fedkseed_pool_sums_in_float64_and_honours_uniform_weighting():
    s = build_strategy("fedkseed", {"num_seeds": 1, "weighting": "uniform"})
    g = {"kseed/pool": torch.zeros(1)}
    s.configure_fit(1, ["a", "b", "c"], 0.1)
    ups = [ClientUpdate(c, {"kseed/pool": torch.tensor([v])}, n)
           for c, v, n in (("a", 1.0, 1), ("b", TINY, 5), ("c", -1.0, 1))]
    out = s.aggregate_fit(1, g, ups)["kseed/pool"]
    assert out.dtype == torch.float32 and out.item() == pytest.approx(TINY / 3, rel=1e-6)


def test_fedkseed_forgets_each_rounds_rate_once_aggregated():
    s = build_strategy("fedkseed", {"num_seeds": 2, "pro": True})
    g = {"kseed/pool": torch.zeros(2)}
    ups = [ClientUpdate("a", {"kseed/pool": torch.tensor([0.5, 0.0])}, 1)]
    for round_ in (1, 2, 3):
        s.configure_fit(round_, ["a"], 0.5)
        g = s.aggregate_fit(round_, g, ups)
    assert s.lrs == {}  # a long run keeps no rate per past round
    s.aggregate_fit(4, g, ups)  # a round the strategy did not configure still aggregates
    assert s.count.tolist() == [4.0, 0.0] and s.abs_sum[0].item() == pytest.approx(3 * 1.0 + 0.5)


def test_yogi_starts_float64_moments_at_the_float64_tau_squared():
    from fedtune.algorithms.fedopt import fedyogi_step

    g = {"w": torch.zeros(1, dtype=torch.float64)}
    tau, beta2, d = 0.1, 0.9, 0.05   # τ² = 0.01 is not a float32 number
    _, _, v = fedyogi_step(g, {"w": torch.tensor([d], dtype=torch.float64)}, {}, {},
                           lr=1.0, beta1=0.0, beta2=beta2, tau=tau)
    expected = tau * tau - (1 - beta2) * d * d  # sign(τ² − Δ²) = +1
    assert v["w"].dtype == torch.float64 and v["w"].item() == pytest.approx(expected, rel=1e-12)


def _mezo_round(s, losses: dict, round_=1):
    g = {"w": torch.zeros(1)}
    s.aggregate_fit(round_, g, [ClientUpdate(c, {"w": torch.zeros(1)}, 1, {"train_loss": v})
                                for c, v in losses.items()])


def test_fedmezo_equal_signals_give_every_client_the_base_rate():
    s = build_strategy("fedmezo", {"alpha": 0.5})
    _mezo_round(s, {"a": 2.0, "b": 2.0})
    assert s.configure_fit(2, ["a", "b"], 0.1) == {"a": {"lr": 0.1}, "b": {"lr": 0.1}}


def test_fedmezo_mean5_signal_averages_each_clients_own_history():
    s = build_strategy("fedmezo", {"alpha": 0.5, "signal": "loss_mean5"})
    _mezo_round(s, {"a": 1.0, "b": 2.5, "c": 2.0}, 1)
    _mezo_round(s, {"a": 3.0, "c": 2.0}, 2)          # b sat this round out
    # signals: a mean(1, 3) = 2, b 2.5, c 2 -> mean 13/6, spread 1/3: Φ = −0.5, 1, −0.5
    lrs = s.configure_fit(3, ["a", "b", "c"], 1.0)
    assert [lrs[c]["lr"] for c in "abc"] == pytest.approx([0.75, 1.5, 0.75])


def test_fedmezo_ignores_a_missing_or_nan_loss_and_honours_uniform_weighting():
    s = build_strategy("fedmezo", {"alpha": 0.5, "weighting": "uniform"})
    g = {"w": torch.zeros(1)}
    out = s.aggregate_fit(1, g, [
        ClientUpdate("a", {"w": torch.tensor([1.0])}, 3, {"train_loss": float("nan")}),
        ClientUpdate("b", {"w": torch.tensor([3.0])}, 1, {}),
        ClientUpdate("c", {"w": torch.tensor([2.0])}, 1, {"train_loss": 1.0})])
    assert out["w"].item() == pytest.approx(2.0)  # not (3 + 3 + 2)/5
    assert s.history == {"c": [1.0]}


def test_dp_fedavg_before_any_round_and_at_the_clip_boundary():
    s = build_strategy("dp_fedavg", {"clip_norm": 5.0, "noise_multiplier": 0.0}, 4)
    assert s.round_metrics() == {"epsilon": 0.0, "delta": 1e-5, "clipped_fraction": 0.0}
    s.load_state_dict({})  # a checkpoint without rates: none spent yet
    assert s.rates == []
    g = {"w": torch.zeros(2)}
    s.aggregate_fit(1, g, [ClientUpdate("a", {"w": torch.tensor([3.0, 4.0])}, 1),   # norm 5 = C
                           ClientUpdate("b", {"w": torch.tensor([6.0, 8.0])}, 1)])  # norm 10 > C
    assert s.round_metrics()["clipped_fraction"] == 0.5  # only norms above C count as clipped


def test_the_privacy_accountant_is_quieted_without_silencing_fedtune():
    import logging

    from fedtune.algorithms.dp_fedavg import dp_epsilon

    assert dp_epsilon(1.0, [0.5], 1e-5) > 0
    assert logging.getLogger("absl").level == logging.ERROR
    assert logging.getLogger("fedtune.server").getEffectiveLevel() <= logging.WARNING
