"""federation.secure_aggregation: what a recipe may combine with it, and the round parameters a
client accepts from the server."""

from __future__ import annotations

import pytest

from fedtune.config import SecureAggregationSection, load_recipe
from fedtune.errors import MessageError, RecipeError
from fedtune.privacy.fixedpoint import FixedPointCodec
from fedtune.runtime.secure_client import parse_round_params
from fedtune.runtime.secure_round import round_params


def _recipe(secure=None, **federation):
    return load_recipe({"federation": {"clients": 3, **federation,
                                       "secure_aggregation": {"enabled": True, **(secure or {})}}})


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_algorithms_that_use_only_the_mean_update_are_accepted(algorithm):
    recipe = _recipe(algorithm=algorithm)
    assert recipe.federation.secure_aggregation.enabled


@pytest.mark.parametrize("algorithm", ["median", "trimmed_mean", "krum", "norm_bounding", "flexlora",
                                       "scaffold", "dp_fedavg", "fedmezo"])
def test_algorithms_that_need_each_update_are_refused_by_name(algorithm):
    with pytest.raises(RecipeError, match=rf"secure_aggregation.enabled: algorithm '{algorithm}' "
                                          r"needs each client's own update.*fedavg"):
        _recipe(algorithm=algorithm, options={"max_norm": 1.0} if algorithm == "norm_bounding" else {})


def test_up_compression_and_detected_attacks_are_refused():
    with pytest.raises(RecipeError, match=r"compression.up must be 'none'.*'topk'"):
        _recipe(compression={"up": {"method": "topk"}})
    with pytest.raises(RecipeError, match=r"compression.up must be 'none'.*'int8'"):
        _recipe(compression={"up": {"method": "int8"}})
    with pytest.raises(RecipeError, match=r"attack.kind 'nan'"):
        _recipe(attack={"clients": ["client_0"], "kind": "nan"})
    # Down compression and undetectable attacks are fine: the sum simply carries them.
    _recipe(compression={"down": {"method": "int8"}})
    _recipe(attack={"clients": ["client_0"], "kind": "sign_flip"})


def test_thresholds_and_round_sizes():
    assert _recipe().federation.secure_aggregation.threshold_for(3) == 2  # default: a majority
    assert SecureAggregationSection(enabled=True).threshold_for(10) == 6
    assert _recipe({"threshold": 3}).federation.secure_aggregation.threshold == 3
    with pytest.raises(RecipeError, match=r"secure_aggregation: threshold 1 of 3 clients is not allowed"):
        _recipe({"threshold": 1})
    with pytest.raises(RecipeError, match=r"threshold 4 of 3 clients"):
        _recipe({"threshold": 4})
    with pytest.raises(RecipeError, match=r"threshold 2 of 4 clients"):  # not more than half
        _recipe({"threshold": 2}, clients=4)
    with pytest.raises(RecipeError, match=r"at least 2 clients per round, got 1"):
        _recipe(clients_per_round=1)
    _recipe(clients=10, clients_per_round=5)  # the threshold follows the round's clients


def test_fixed_point_settings_are_checked_at_load_time():
    with pytest.raises(RecipeError, match=r"federation.secure_aggregation.frac_bits"):
        _recipe({"frac_bits": 60})
    with pytest.raises(RecipeError, match=r"exceeds 2\^53"):
        _recipe({"frac_bits": 40, "clip": 1000.0})
    with pytest.raises(RecipeError, match=r"unknown key"):
        _recipe({"bits": 20})


def _params(**changes):
    params = round_params(["a", "b", "c"], 2, "round-1-x", FixedPointCodec(), "examples")
    return {**params, **changes}


def test_round_parameters_from_the_server_are_checked():
    parsed = parse_round_params(_params(), "b")
    assert parsed.peers == ["a", "b", "c"] and parsed.threshold == 2
    assert parsed.codec == FixedPointCodec()
    bad = {
        "not among the peers": _params(peers=["a", "c", "d"]),
        "threshold 1 of 3": _params(threshold=1),
        "threshold must be an int": _params(threshold=True),
        "session must be": _params(session=""),
        "weighting must be": _params(weighting="loss"),
        "clip must be a number": _params(clip="64"),
        "frac_bits must be in": _params(frac_bits=60),
        "a name is listed twice": _params(peers=["a", "b", "b"]),
        "exactly the keys": {**_params(), "extra": 1},
    }
    for reason, params in bad.items():
        with pytest.raises(MessageError, match=reason):
            parse_round_params(params, "b")


def test_a_client_with_its_own_recipe_refuses_weaker_parameters():
    own = SecureAggregationSection(enabled=True, threshold=3)
    with pytest.raises(MessageError, match="threshold 2 is below this client's recipe"):
        parse_round_params(_params(), "b", own)
    with pytest.raises(MessageError, match="fixed-point code"):
        parse_round_params(_params(threshold=3, frac_bits=16), "b", own)
    assert parse_round_params(_params(threshold=3), "b", own).threshold == 3
