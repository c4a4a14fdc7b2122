"""Every algorithm's options (`federation.options`): the defaults a recipe gets when it sets nothing
(what `fedtune algorithms` lists; the server optimisers' are those of Reddi et al. 2021), and the
range each option accepts, checked at its edges: the last value allowed and the first refused,
with an error naming the key."""

from __future__ import annotations

import pytest

from fedtune.algorithms import algorithm_options, available_algorithms
from fedtune.errors import RecipeError

DEFAULTS = {
    "fedavg": {"weighting": "examples"},
    "fedprox": {"mu": 0.01, "weighting": "examples"},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9, "weighting": "examples"},
    "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001, "weighting": "examples"},
    "fedyogi": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001, "weighting": "examples"},
    "fedadagrad": {"server_lr": 0.01, "beta1": 0.9, "tau": 0.001, "weighting": "examples"},
    "scaffold": {"global_lr": 1.0, "weighting": "examples"},
    "dp_fedavg": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "noise_seed": None},
    "flexlora": {"weighting": "examples"},
    "median": {},
    "trimmed_mean": {"trim_ratio": 0.1},
    "krum": {"byzantine": 1, "multi": 1, "weighting": "uniform"},
    "fedmezo": {"eps": 0.001, "alpha": 0.0, "signal": "loss", "weighting": "examples"},
    "fedkseed": {"num_seeds": 4096, "eps": 0.0005, "pool_seed": 0, "pro": False, "pro_clip": 1000.0,
                 "loss_diff_clip": None, "weighting": "examples"},
    "offsite": {"adapter_bottom": 1, "adapter_top": 1, "drop_ratio": 0.5, "weighting": "examples",
                "distill": {"steps": 0, "lr": 1e-4, "batch_size": 8, "lm_weight": 1.0, "kd_weight": 1.0,
                            "data": "synthetic", "examples": 2000}},
    "fedavg_ft": {"ft_steps": 5, "ft_lr": None, "weighting": "examples"},
    "ditto": {"lam": 0.1, "personal_steps": None, "personal_lr": None, "weighting": "examples"},
    "fedrep": {"personal": [], "top_layers": 1, "personal_steps": None, "weighting": "examples"},
    "fedsa_lora": {"weighting": "examples"},
    "ffa_lora": {"weighting": "examples"},
    "pfedme": {"lam": 15.0, "inner_steps": 5, "personal_lr": None, "beta": 1.0, "weighting": "examples"},
    "pfedgate": {"sparsity": 0.5, "gate_lr": 0.1, "weighting": "examples"},
    "hetlora": {"reg": 0.001, "gamma": 0.25, "prune": True, "weighting": "norm"},
    "flora": {"weighting": "examples"},
    "fedex": {"base": "fedavg", "grid": {"train.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}, "eta": None,
              "schedule": "auto", "entropy_cutoff": 0.0, "discount": 0.0, "feedback": "difference",
              "seed": 0, **dict.fromkeys(("weighting", "mu", "server_lr", "momentum", "beta1", "beta2",
                                          "tau", "trim_ratio", "byzantine", "multi", "max_norm"))},
    "fedsp": {"shared_blocks": 1, "server_steps": 5, "server_lr": None, "server_data": "synthetic",
              "server_examples": 20, "weighting": "examples",
              "distill": {"steps": 50, "lr": 5e-4, "batch_size": 8, "data": "synthetic", "examples": 1000}},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_defaults_of_every_algorithm(name):
    assert algorithm_options(name, {}).model_dump() == DEFAULTS[name]


def test_every_algorithm_has_its_defaults_listed_here():
    assert sorted(DEFAULTS) == sorted(set(available_algorithms()) - {"norm_bounding"})
    with pytest.raises(RecipeError, match="federation.options.max_norm: Field required"):
        algorithm_options("norm_bounding", {})  # no default: the bound is the user's choice
    assert algorithm_options("norm_bounding", {"max_norm": 2.0}).model_dump() == {
        "max_norm": 2.0, "weighting": "examples"}


# (algorithm, key, the edge value allowed, the first value refused past that edge)
EDGES = [
    ("fedprox", "mu", 0.0, -1e-9),
    ("fedavgm", "server_lr", 1e-9, 0.0),
    ("fedavgm", "momentum", 0.0, -1e-9),
    ("fedavgm", "momentum", 0.999, 1.0),
    ("fedadam", "server_lr", 1e-9, 0.0),
    ("fedadam", "beta1", 0.0, -1e-9),
    ("fedadam", "beta1", 0.999, 1.0),
    ("fedadam", "beta2", 0.0, -1e-9),
    ("fedadam", "beta2", 0.999, 1.0),
    ("fedadam", "tau", 1e-9, 0.0),
    ("fedadagrad", "server_lr", 1e-9, 0.0),
    ("fedadagrad", "beta1", 0.0, -1e-9),
    ("fedadagrad", "beta1", 0.999, 1.0),
    ("fedadagrad", "tau", 1e-9, 0.0),
    ("scaffold", "global_lr", 1e-9, 0.0),
    ("dp_fedavg", "clip_norm", 1e-9, 0.0),
    ("dp_fedavg", "noise_multiplier", 0.0, -1e-9),
    ("dp_fedavg", "delta", 1e-9, 0.0),
    ("dp_fedavg", "delta", 0.999, 1.0),
    ("trimmed_mean", "trim_ratio", 0.0, -1e-9),
    ("trimmed_mean", "trim_ratio", 0.499, 0.5),
    ("krum", "byzantine", 0, -1),
    ("krum", "multi", 1, 0),
    ("norm_bounding", "max_norm", 1e-9, 0.0),
    ("fedmezo", "eps", 1e-9, 0.0),
    ("fedmezo", "alpha", 0.0, -1e-9),
    ("fedkseed", "num_seeds", 1, 0),
    ("fedkseed", "num_seeds", 1 << 20, (1 << 20) + 1),
    ("fedkseed", "eps", 1e-9, 0.0),
    ("fedkseed", "pool_seed", 0, -1),
    ("fedkseed", "pro_clip", 1e-9, 0.0),
    ("fedkseed", "loss_diff_clip", 1e-9, 0.0),
    ("offsite", "adapter_bottom", 0, -1),
    ("offsite", "adapter_top", 0, -1),
    ("offsite", "drop_ratio", 0.0, -1e-9),
    ("offsite", "drop_ratio", 0.999, 1.0),
    ("fedavg_ft", "ft_steps", 1, 0),
    ("fedavg_ft", "ft_lr", 1e-9, 0.0),
    ("ditto", "lam", 0.0, -1e-9),
    ("ditto", "personal_steps", 1, 0),
    ("ditto", "personal_lr", 1e-9, 0.0),
    ("fedrep", "top_layers", 1, 0),
    ("fedrep", "personal_steps", 1, 0),
    ("pfedme", "lam", 1e-9, 0.0),
    ("pfedme", "inner_steps", 1, 0),
    ("pfedme", "beta", 1e-9, 0.0),
    ("pfedgate", "sparsity", 1.0, 1.0 + 1e-9),
    ("pfedgate", "sparsity", 1e-9, 0.0),
    ("pfedgate", "gate_lr", 1e-9, 0.0),
    ("hetlora", "reg", 0.0, -1e-9),
    ("hetlora", "gamma", 1e-9, 0.0),
    ("hetlora", "gamma", 0.999, 1.0),
    ("fedsp", "shared_blocks", 1, 0),
    ("fedsp", "server_steps", 0, -1),
    ("fedsp", "server_lr", 1e-9, 0.0),
    ("fedsp", "server_examples", 1, 0),
]


@pytest.mark.parametrize("name,key,ok,bad", EDGES)
def test_each_option_accepts_its_range_up_to_the_edge(name, key, ok, bad):
    base = {"max_norm": 1.0} if name == "norm_bounding" and key != "max_norm" else {}
    assert getattr(algorithm_options(name, {**base, key: ok}), key) == ok
    with pytest.raises(RecipeError, match=rf"federation\.options\.{key}: "):
        algorithm_options(name, {**base, key: bad})


DISTILL_EDGES = [("steps", 0, -1), ("lr", 1e-9, 0.0), ("batch_size", 1, 0), ("lm_weight", 0.0, -1e-9),
                 ("kd_weight", 0.0, -1e-9), ("examples", 1, 0)]


@pytest.mark.parametrize("key,ok,bad", DISTILL_EDGES)
def test_offsite_distillation_options_accept_their_range(key, ok, bad):
    assert getattr(algorithm_options("offsite", {"distill": {key: ok}}).distill, key) == ok
    with pytest.raises(RecipeError, match=rf"federation\.options\.distill\.{key}: "):
        algorithm_options("offsite", {"distill": {key: bad}})


@pytest.mark.parametrize("name", sorted(set(available_algorithms())))
def test_every_algorithm_refuses_an_unknown_option(name):
    with pytest.raises(RecipeError, match="federation.options.bogus: unknown key"):
        algorithm_options(name, {"bogus": 1, **({"max_norm": 1.0} if name == "norm_bounding" else {})})


@pytest.mark.parametrize("name,key,value", [
    ("fedavg", "weighting", "count"), ("krum", "weighting", "median"),
    ("fedmezo", "signal", "grad"), ("offsite", "distill", {"bogus": 1}),
])
def test_a_choice_outside_the_listed_ones_is_refused(name, key, value):
    with pytest.raises(RecipeError, match=rf"federation\.options\.{key}"):
        algorithm_options(name, {key: value})


def test_every_problem_with_the_options_is_listed_in_one_message():
    with pytest.raises(RecipeError) as err:
        algorithm_options("fedprox", {"mu": -1, "muu": 2})
    assert str(err.value) == ("federation.options.mu: Input should be greater than or equal to 0; "
                              "federation.options.muu: unknown key (options of fedprox: mu, weighting)")


def test_dp_fedavg_samples_against_the_federation_size_it_was_built_for():
    import torch

    from fedtune.algorithms import build_strategy
    from fedtune.algorithms.base import ClientUpdate

    s = build_strategy("dp_fedavg", {"noise_multiplier": 0.0}, 4)
    s.aggregate_fit(1, {"w": torch.zeros(1)}, [ClientUpdate("a", {"w": torch.zeros(1)}, 1)])
    assert s.rates == [0.25]  # one of four clients sampled
