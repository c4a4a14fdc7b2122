"""Fixed-point codec for secure aggregation: round trip, error bound, overflow refusal."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.errors import RecipeError
from fedtune.privacy.fixedpoint import FixedPointCodec


def test_round_trip_within_one_unit() -> None:
    codec = FixedPointCodec(frac_bits=24)
    x = np.array([0.0, 1.0, -1.0, 0.1, -3.14159, 63.999, 1e-9])
    decoded = codec.decode(codec.encode(x, 1.0))
    assert np.all(np.abs(decoded - x) <= 2.0**-24)


def test_hand_computed_codes() -> None:
    codec = FixedPointCodec(frac_bits=4)
    codes = codec.encode(np.array([1.0, -0.5, 0.03125]), 2.0)
    # 2 * 1 * 16 = 32; 2 * -0.5 * 16 = -16 -> 2^64 - 16; 2 * 1/32 * 16 = 1.
    assert codes.dtype == np.uint64
    assert codes.tolist() == [32, 2**64 - 16, 1]
    assert codec.encode_weight(2.5).tolist() == [40]


def test_sum_of_codes_decodes_to_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    codec = FixedPointCodec(frac_bits=20, clip=4.0, max_weight=100.0)
    xs = [rng.uniform(-4, 4, size=1000) for _ in range(7)]
    ws = [float(w) for w in rng.uniform(0, 100, size=7)]
    total = np.zeros(1000, dtype=np.uint64)
    for x, w in zip(xs, ws):
        total += codec.encode(x, w)  # wraps modulo 2^64
    expected = sum(w * x for x, w in zip(xs, ws))
    assert np.max(np.abs(codec.decode(total) - expected)) <= codec.error_bound(7)
    assert codec.error_bound(7) == 7 * 2.0**-20


def test_values_are_clipped_to_the_stated_range() -> None:
    codec = FixedPointCodec(clip=2.0)
    x = np.array([5.0, -7.0, 1.5])
    assert codec.decode(codec.encode(x, 1.0)).tolist() == [2.0, -2.0, 1.5]
    assert codec.clipped_count(x) == 2


def test_overflow_refused() -> None:
    codec = FixedPointCodec(frac_bits=24, clip=64.0, max_weight=2.0**20)
    limit = codec.max_clients()
    assert limit * (2.0**50 + 1) < 2.0**63
    codec.check_capacity(limit)
    with pytest.raises(RecipeError, match="cannot sum"):
        codec.check_capacity(limit + 1)


def test_precision_losing_configuration_refused() -> None:
    with pytest.raises(RecipeError, match="2\\^53"):
        FixedPointCodec(frac_bits=40, clip=64.0, max_weight=2.0**20)
    for bad in ({"frac_bits": -1}, {"frac_bits": 53}, {"clip": 0.0}, {"max_weight": float("inf")}):
        with pytest.raises(RecipeError):
            FixedPointCodec(**bad)  # type: ignore[arg-type]


def test_bad_weight_or_values_raise_value_error() -> None:
    codec = FixedPointCodec(max_weight=10.0)
    with pytest.raises(ValueError, match="weight"):
        codec.encode(np.zeros(2), 11.0)
    with pytest.raises(ValueError, match="weight"):
        codec.encode(np.zeros(2), -1.0)
    with pytest.raises(ValueError, match="finite"):
        codec.encode(np.array([np.nan]), 1.0)
