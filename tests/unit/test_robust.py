"""Byzantine-robust aggregation rules on numbers computed by hand."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.robust import (
    krum_aggregate,
    krum_scores,
    median_aggregate,
    norm_bounding_aggregate,
    trimmed_mean_aggregate,
)
from fedtune.errors import RecipeError


def vec(*xs: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(xs, dtype=torch.float32)}


def test_median_odd_and_even():
    three = [vec(1, 5), vec(3, -1), vec(2, 0)]
    # sorted per coordinate: [1, 2, 3] and [-1, 0, 5] -> middles 2 and 0
    torch.testing.assert_close(median_aggregate(three)["w"], torch.tensor([2.0, 0.0]))
    four = [*three, vec(10, 2)]
    # [1, 2, 3, 10] -> (2 + 3)/2 = 2.5 ; [-1, 0, 2, 5] -> (0 + 2)/2 = 1
    torch.testing.assert_close(median_aggregate(four)["w"], torch.tensor([2.5, 1.0]))


def test_median_strategy_adds_to_global():
    s = build_strategy("median", {})
    ups = [ClientUpdate(c, vec(*x), n) for c, x, n in
           (("a", (1, 5), 1), ("b", (3, -1), 1), ("c", (2, 0), 1000))]  # counts are ignored
    out = s.aggregate_fit(1, vec(10, 10), ups)
    torch.testing.assert_close(out["w"], torch.tensor([12.0, 10.0]))  # [10, 10] + [2, 0]


def test_trimmed_mean_beta_02_on_five():
    ups = [vec(1, 3), vec(100, 0), vec(3, -50), vec(2, 1), vec(4, 2)]
    # ⌊0.2·5⌋ = 1 dropped each side: [1, 2, 3, 4, 100] -> mean(2, 3, 4) = 3
    #                                  [-50, 0, 1, 2, 3] -> mean(0, 1, 2) = 1
    torch.testing.assert_close(trimmed_mean_aggregate(ups, trim_ratio=0.2)["w"], torch.tensor([3.0, 1.0]))
    # β = 0 is the plain mean: [110/5, -44/5]
    torch.testing.assert_close(trimmed_mean_aggregate(ups, trim_ratio=0.0)["w"], torch.tensor([22.0, -8.8]))


def test_trimmed_mean_floor_is_exact():
    ups = [vec(float(i)) for i in range(100)]
    # ⌊0.29·100⌋ = 29 although 0.29·100 == 28.999… in floating point: keep 29..70 -> mean 49.5
    torch.testing.assert_close(trimmed_mean_aggregate(ups, trim_ratio=0.29)["w"], torch.tensor([49.5]))


def krum_population() -> list[dict[str, torch.Tensor]]:
    """A Byzantine e = (10, 10) first, then honest b, a, c, d; coordinates split over two tensors."""
    points = {"e": (10, 10), "b": (0, 1), "a": (1, 1), "c": (2, 2), "d": (1, 3)}
    return [{"x": torch.tensor([float(p[0])]), "y": torch.tensor([float(p[1])])} for p in points.values()]


def test_krum_scores_by_hand():
    # squared distances: ab 1, ac 2, ad 4, ae 162, bc 5, bd 5, be 181, cd 2, ce 128, de 130
    # f = 1 -> n − f − 2 = 2 nearest: a 1+2=3, b 1+5=6, c 2+2=4, d 2+4=6, e 128+130=258
    scores = krum_scores(krum_population(), byzantine=1)
    assert scores.tolist() == [258.0, 6.0, 3.0, 4.0, 6.0]  # order e, b, a, c, d


def test_krum_picks_the_honest_centre():
    out = krum_aggregate([(u, 1.0) for u in krum_population()], byzantine=1)
    assert out["x"].tolist() == [1.0] and out["y"].tolist() == [1.0]  # a


def test_multi_krum_averages_the_best():
    pop = krum_population()
    # m = 2: a (score 3) and c (score 4): uniform mean of (1, 1) and (2, 2) = (1.5, 1.5)
    s = build_strategy("krum", {"byzantine": 1, "multi": 2})
    examples = [1, 1, 1, 3, 1]  # e, b, a, c, d
    ups = [ClientUpdate(str(i), u, n) for i, (u, n) in enumerate(zip(pop, examples))]
    out = s.aggregate_fit(1, {"x": torch.zeros(1), "y": torch.zeros(1)}, ups)
    assert out["x"].tolist() == [1.5] and out["y"].tolist() == [1.5]
    # by examples: a has 1, c has 3 -> (1·1 + 2·3)/4 = 1.75
    s = build_strategy("krum", {"byzantine": 1, "multi": 2, "weighting": "examples"})
    out = s.aggregate_fit(1, {"x": torch.zeros(1), "y": torch.zeros(1)}, ups)
    assert out["x"].tolist() == [1.75] and out["y"].tolist() == [1.75]


def test_krum_refuses_too_few_updates():
    four = krum_population()[1:]
    with pytest.raises(ValueError, match="byzantine"):
        krum_aggregate([(u, 1.0) for u in four], byzantine=1)  # n = 4 ≤ 2·1 + 2
    s = build_strategy("krum", {"byzantine": 1})
    with pytest.raises(RecipeError, match="federation.options.byzantine"):
        s.aggregate_fit(1, {"x": torch.zeros(1), "y": torch.zeros(1)},
                        [ClientUpdate(str(i), u, 1) for i, u in enumerate(four)])
    with pytest.raises(RecipeError, match="federation.options.multi"):
        build_strategy("krum", {"multi": 5}).aggregate_fit(
            1, {"x": torch.zeros(1), "y": torch.zeros(1)},
            [ClientUpdate(str(i), u, 1) for i, u in enumerate(krum_population())])  # 5 > n − f = 4


def test_norm_bounding_clips_big_leaves_small():
    small = {"a": torch.tensor([0.3]), "b": torch.tensor([0.4])}  # ‖·‖ = 0.5 ≤ 1: kept
    big = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}    # ‖·‖ = 5 over both tensors -> ×1/5
    out = norm_bounding_aggregate([(small, 1.0), (big, 1.0)], max_norm=1.0)
    # mean of (0.3, 0.4) and (0.6, 0.8) = (0.45, 0.6)
    torch.testing.assert_close(out["a"], torch.tensor([0.45]))
    torch.testing.assert_close(out["b"], torch.tensor([0.6]))
    # by examples through the strategy, 3 and 1: (3·(0.3, 0.4) + (0.6, 0.8)) / 4 = (0.375, 0.5)
    s = build_strategy("norm_bounding", {"max_norm": 1.0})
    out = s.aggregate_fit(1, {"a": torch.ones(1), "b": torch.ones(1)},
                          [ClientUpdate("s", small, 3), ClientUpdate("x", big, 1)])
    torch.testing.assert_close(out["a"], torch.tensor([1.375]))
    torch.testing.assert_close(out["b"], torch.tensor([1.5]))


@pytest.mark.parametrize("name,options", [
    ("median", {}), ("trimmed_mean", {"trim_ratio": 0.2}), ("krum", {"byzantine": 1, "multi": 2}),
    ("norm_bounding", {"max_norm": 1.0}),
])
def test_each_rule_keeps_dtypes(name, options):
    s = build_strategy(name, options)
    g = {"w": torch.ones(2, dtype=torch.bfloat16), "d": torch.ones(1, dtype=torch.float64)}
    ups = [ClientUpdate(str(i), {"w": torch.full((2,), 0.125 * i, dtype=torch.bfloat16),
                                 "d": torch.full((1,), 0.125 * i, dtype=torch.float64)}, 1)
           for i in range(5)]
    out = s.aggregate_fit(1, g, ups)
    assert out["w"].dtype == torch.bfloat16 and out["d"].dtype == torch.float64
    assert s.state_dict() == {}


def test_pure_rules_keep_dtypes():
    ups = [{"w": torch.full((2,), float(i), dtype=torch.bfloat16)} for i in range(5)]
    assert median_aggregate(ups)["w"].dtype == torch.bfloat16
    assert trimmed_mean_aggregate(ups, trim_ratio=0.2)["w"].dtype == torch.bfloat16
    assert krum_aggregate([(u, 1.0) for u in ups], byzantine=1)["w"].dtype == torch.bfloat16
    assert norm_bounding_aggregate([(u, 1.0) for u in ups], max_norm=1.0)["w"].dtype == torch.bfloat16


@pytest.mark.parametrize("name,options,key", [
    ("median", {"trim_ratio": 0.1}, "trim_ratio"),
    ("trimmed_mean", {"trim_ratio": 0.5}, "trim_ratio"),
    ("krum", {"byzantines": 1}, "byzantines"),
    ("norm_bounding", {}, "max_norm"),  # required: no norm fits every adapter
])
def test_bad_options_fail_with_their_path(name, options, key):
    with pytest.raises(RecipeError, match=f"federation.options.{key}"):
        build_strategy(name, options)
