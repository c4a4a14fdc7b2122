"""A server's secure-aggregation round parameters, however hostile, are a MessageError at most."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.errors import MessageError
from fedtune.runtime.secure_client import parse_round_params

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10**400, -(10**400), 2**64]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)
good = {"peers": ["a", "b", "c"], "threshold": 2, "session": "s", "frac_bits": 24, "clip": 64.0,
        "max_weight": 1024.0, "weighting": "examples"}


def test_good_parameters_parse():
    params = parse_round_params(dict(good), "a")
    assert params.peers == ["a", "b", "c"] and params.threshold == 2 and params.weighting == "examples"


@pytest.mark.parametrize("key", ["clip", "max_weight", "frac_bits", "threshold"])
@pytest.mark.parametrize("value", [10**400, -(10**400), float("inf"), float("nan"), True, "1"],
                         ids=["10**400", "-10**400", "inf", "nan", "true", "text"])
def test_out_of_range_numbers_are_refused(key, value):
    with pytest.raises(MessageError, match=key):
        parse_round_params({**good, key: value}, "a")


@settings(max_examples=300, deadline=None, database=None)
@given(key=st.sampled_from(sorted(good)), value=values)
def test_any_single_bad_parameter_is_a_message_error(key, value):
    with contextlib.suppress(MessageError):
        parse_round_params({**good, key: value}, "a")


@settings(max_examples=200, deadline=None, database=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(good)), values, min_size=1, max_size=3))
def test_any_bad_parameter_is_a_message_error(changes):
    with contextlib.suppress(MessageError):
        parse_round_params({**good, **changes}, "a")
