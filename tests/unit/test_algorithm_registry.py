"""The algorithm registry: names, option validation with the key's path, what an algorithm needs
from the rest of the recipe, and the strategies' checkpointable state."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import (
    algorithm_options,
    available_algorithms,
    build_local,
    build_strategy,
    registry,
)
from fedtune.algorithms.base import AlgorithmSpec, ClientUpdate, StandardLocal, register
from fedtune.config import Recipe
from fedtune.errors import RecipeError

ALL = ["ditto", "dp_fedavg", "fedadagrad", "fedadam", "fedavg", "fedavg_ft", "fedavgm", "fedex", "fedkseed",
       "fedmezo", "fedprox", "fedrep", "fedsa_lora", "fedsp", "fedyogi", "ffa_lora", "flexlora",
       "flora", "hetlora", "krum", "median", "norm_bounding", "offsite", "pfedgate", "pfedme",
       "scaffold", "trimmed_mean"]


def test_every_algorithm_is_registered_once_and_listed_sorted():
    assert available_algorithms() == ALL
    spec = registry()["fedavg"]
    with pytest.raises(ValueError, match="'fedavg' is registered twice"):
        register("fedavg", spec.build)
    with pytest.raises(ValueError, match="'fedavg2' is not in fedtune.algorithms.catalog"):
        register("fedavg2", spec.build)
    assert registry()["fedavg"] is spec and "fedavg2" not in registry()


def test_sum_only_is_set_for_exactly_the_algorithms_that_use_only_the_weighted_mean():
    assert sorted(n for n, s in registry().items() if s.sum_only) == [
        "ditto", "fedadagrad", "fedadam", "fedavg", "fedavg_ft", "fedavgm", "fedkseed", "fedprox",
        "fedrep", "fedsa_lora", "fedyogi", "ffa_lora", "offsite", "pfedgate", "pfedme"]


def test_unknown_and_bad_options_name_the_key_and_list_the_allowed_ones():
    with pytest.raises(RecipeError) as err:
        algorithm_options("fedprox", {"mu": -1, "muu": 2})
    text = str(err.value)
    assert "federation.options.mu:" in text and "greater than or equal to 0" in text
    assert "federation.options.muu: unknown key" in text
    assert "(options of fedprox: mu, weighting)" in text
    with pytest.raises(RecipeError, match=r"\(options of median: \(none\)\)"):
        algorithm_options("median", {"x": 1})
    assert algorithm_options("fedprox", {"mu": 0.5}).mu == 0.5


def test_local_procedures_by_algorithm():
    assert isinstance(build_local("fedavg", {}), StandardLocal)
    assert type(build_local("scaffold", {})).__name__ == "ScaffoldLocal"
    assert type(build_local("fedprox", {"mu": 0.1})).__name__ == "ProxLocal"
    assert type(build_local("fedmezo", {})).__name__ == "MeZOLocal"
    assert type(build_local("fedkseed", {})).__name__ == "KSeedLocal"


def _recipe(**federation):
    return {"federation": {"clients": 2, "rounds": 1, **federation}}


@pytest.mark.parametrize("federation,train,adapter,message", [
    ({"algorithm": "fedkseed"}, {"weight_decay": 0.1}, {}, "train.weight_decay: fedkseed needs 0"),
    ({"algorithm": "fedkseed", "compression": {"up": {"method": "fp16"}}}, {}, {},
     "federation.compression.up: fedkseed sends K scalars"),
    ({"algorithm": "fedkseed", "compression": {"down": {"method": "int8"}}}, {}, {},
     "federation.compression.down"),
    ({"algorithm": "fedkseed", "options": {"pro": True}, "secure_aggregation": {"enabled": True}},
     {}, {}, "FedKSeed-Pro"),
    ({"algorithm": "offsite"}, {}, {"method": "lora"}, "adapter.method: offsite"),
    ({"algorithm": "offsite", "options": {"adapter_bottom": 0, "adapter_top": 0}}, {},
     {"method": "full"}, "adapter_bottom + adapter_top >= 1"),
])
def test_what_an_algorithm_needs_from_the_recipe_is_checked_at_load(federation, train, adapter, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        Recipe.model_validate({"federation": {"clients": 2, "rounds": 1, **federation},
                               "train": train, "adapter": adapter})


def test_recipes_that_suit_their_algorithm_load():
    Recipe.model_validate({"federation": {"algorithm": "fedkseed", "options": {"pro": False},
                                          "secure_aggregation": {"enabled": True}, "clients": 2}})
    Recipe.model_validate({"federation": {"algorithm": "offsite"}, "adapter": {"method": "full"}})


@pytest.mark.parametrize("algorithm", ["fedsa_lora", "ffa_lora", "pfedgate"])
def test_the_algorithms_that_split_lora_take_lora_and_qlora_only(algorithm):
    from fedtune.config import load_recipe
    from fedtune.errors import RecipeError

    for method in ("lora", "qlora"):
        assert load_recipe("default", [f"federation.algorithm={algorithm}",
                                       f"adapter.method={method}"]).adapter.method == method
    with pytest.raises(RecipeError, match=rf"adapter\.method: {algorithm} shares or freezes .*got 'ia3'"):
        load_recipe("default", [f"federation.algorithm={algorithm}", "adapter.method=ia3"])


def test_stateless_strategies_refuse_foreign_state():
    s = build_strategy("fedavg", {})
    s.load_state_dict({})
    with pytest.raises(ValueError, match="FedAvg keeps no state"):
        s.load_state_dict({"m/w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"FedAvg keeps no state, got \['a', 'b', 'c'\]$"):
        s.load_state_dict({k: torch.zeros(1) for k in "dcba"})  # the first three, sorted
    assert s.state_dict() == {} and s.round_metrics() == {} and s.min_updates() == 1
    assert s.configure_fit(1, ["a", "b"], 0.5) == {"a": {"lr": 0.5}, "b": {"lr": 0.5}}
    assert s.fit_tensors(1, {"w": torch.zeros(1)}) == {} and s.update_specs({}) == {}


@pytest.mark.parametrize("name,options", [
    ("fedavgm", {}), ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}),
    ("scaffold", {}), ("fedmezo", {}), ("dp_fedavg", {"noise_multiplier": 0.0}),
    ("fedkseed", {"num_seeds": 4, "pro": True}),
])
def test_a_resumed_strategy_continues_exactly(name, options):
    """Two rounds in one go equal one round, a checkpoint, a fresh strategy and the second round."""
    key = "kseed/pool" if name == "fedkseed" else "w"
    g = {key: torch.zeros(4)}

    def updates(r):
        extra = {"scaffold/dc/w": torch.full((4,), 0.1 * r)} if name == "scaffold" else {}
        return [ClientUpdate("a", {key: torch.tensor([0.1, -0.2, 0.3, 0.0]) * r, **extra}, 3,
                             {"train_loss": 1.0 + r}),
                ClientUpdate("b", {key: torch.tensor([-0.4, 0.1, 0.0, 0.2]), **extra}, 1,
                             {"train_loss": 2.0})]

    one = build_strategy(name, options, 2)
    one.configure_fit(1, ["a", "b"], 0.1)
    one.fit_tensors(1, g)
    g1 = one.aggregate_fit(1, g, updates(1))
    saved = {k: v.clone() for k, v in one.state_dict().items()}
    planned = one.configure_fit(2, ["a", "b"], 0.1)
    one.fit_tensors(2, g1)
    g2 = one.aggregate_fit(2, g1, updates(2))
    two = build_strategy(name, options, 2)
    two.load_state_dict(saved)
    assert two.configure_fit(2, ["a", "b"], 0.1) == planned  # FedMeZO: the same personal rates
    two.fit_tensors(2, g1)
    torch.testing.assert_close(two.aggregate_fit(2, g1, updates(2))[key], g2[key])
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[k], v)


def test_server_optimiser_refuses_unknown_state_keys():
    s = build_strategy("fedadam", {})
    with pytest.raises(ValueError, match="unexpected server optimizer state 'x/w'"):
        s.load_state_dict({"x/w": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected server optimizer state 'w'"):
        s.load_state_dict({"w": torch.zeros(1)})


def test_a_spec_defaults_to_plain_local_training():
    spec = AlgorithmSpec("x", "x", config=type(registry()["fedavg"].config()), build=lambda c, n: None)
    assert isinstance(spec.local(spec.config()), StandardLocal)
    assert spec.check is None and spec.sum_only is False


def test_the_torch_side_types_load_on_first_use():
    import fedtune.algorithms as algorithms
    from fedtune.algorithms import base

    assert algorithms.ClientUpdate is base.ClientUpdate and algorithms.Strategy is base.Strategy
    with pytest.raises(AttributeError, match="module 'fedtune.algorithms' has no attribute 'nope'"):
        algorithms.nope  # noqa: B018


def test_only_strategies_built_for_a_federation_size_ask_for_it():
    from fedtune.algorithms import build_strategy, registry

    sized = sorted(name for name, spec in registry().items() if spec.needs_clients)
    assert sized == ["dp_fedavg", "scaffold"]
    for name in sized:
        with pytest.raises(ValueError, match=f"the {name} strategy needs the number of clients"):
            build_strategy(name, {"noise_multiplier": 0.0} if name == "dp_fedavg" else {})
    # SCAFFOLD's server control variate is the mean over all N clients: c += sum(dc) / N.
    s = build_strategy("scaffold", {}, 4)
    g = {"w": torch.zeros(1)}
    s.fit_tensors(1, g)
    s.aggregate_fit(1, g, [ClientUpdate("a", {"w": torch.zeros(1), "scaffold/dc/w": torch.tensor([2.0])}, 1)])
    assert s.state_dict()["scaffold/c/w"].item() == 0.5
    assert build_strategy("fedavg", {}).__class__.__name__ == "FedAvg"   # no size needed


# -- every refusal of the algorithms' recipe checks, word for word ------------------------------

SUM_ONLY = ("ditto, fedadagrad, fedadam, fedavg, fedavg_ft, fedavgm, fedkseed, fedprox, fedrep, fedsa_lora, "
            "fedyogi, ffa_lora, offsite, pfedgate, pfedme")
SECAGG = {"clients": 3, "secure_aggregation": {"enabled": True}}
LOADS = "invalid recipe:\n  recipe: "

REFUSED = [
    ({"federation": {"algorithm": "nope"}},
     "federation.algorithm: unknown algorithm 'nope'; allowed: " + ", ".join(ALL)),
    ({"federation": {"algorithm": "fedprox", "options": {"mu": -1}}},
     "federation: federation.options.mu: Input should be greater than or equal to 0 (options of fedprox: "
     "mu, weighting)"),
    ({"bench": {"algorithms": [{"name": "fedprox", "options": {"mu": -1}}]}},
     "bench.algorithms.0: options.mu: Input should be greater than or equal to 0 (options of fedprox: "
     "mu, weighting)"),
    ({"federation": {"algorithm": "scaffold", **SECAGG}},
     "federation: secure_aggregation.enabled: algorithm 'scaffold' needs each client's own update (or "
     "per-client tensors) on the server, which secure aggregation hides; it works with algorithms that "
     "use only the sum of the updates: " + SUM_ONLY),
    ({"federation": {**SECAGG, "compression": {"up": {"method": "fp16"}}}},
     "federation: secure_aggregation.enabled: compression.up must be 'none' (masked inputs are 64-bit "
     "integers that no codec can shrink); got 'fp16'"),
    ({"federation": {**SECAGG, "attack": {"kind": "nan"}}},
     "federation: secure_aggregation.enabled: attack.kind 'nan' is a server-side detection experiment; "
     "with secure aggregation the server sees no individual update"),
    ({"federation": {**SECAGG, "attack": {"kind": "inf"}}},
     "federation: secure_aggregation.enabled: attack.kind 'inf' is a server-side detection experiment; "
     "with secure aggregation the server sees no individual update"),
    ({"federation": {**SECAGG, "clients_per_round": 1}},
     "federation: secure_aggregation.enabled: needs at least 2 clients per round, got 1"),
    ({"federation": {"clients": 3, "secure_aggregation": {"enabled": True, "threshold": 1}}},
     "federation: secure_aggregation: threshold 1 of 3 clients is not allowed: it must be at least 2 and "
     "more than half the clients (2..3)"),
    ({"adapter": {"method": "ia3", "rank_per_client": [2, 4]}, "federation": {"algorithm": "flexlora"}},
     "(top level): adapter.rank_per_client: needs adapter.method lora, got 'ia3'"),
    ({"adapter": {"r": 4, "rank_per_client": [2, 8]}, "federation": {"algorithm": "hetlora"}},
     "(top level): adapter.rank_per_client: rank 8 is above adapter.r=4 (the model is built at adapter.r, "
     "the largest rank)"),
    ({"adapter": {"rank_per_client": [2, 4, 8]}, "federation": {"algorithm": "hetlora"}},
     "(top level): adapter.rank_per_client: 3 ranks for federation.clients=2"),
    ({"adapter": {"rank_per_client": {"ranks": [2, 8], "resources": [1.0]}}, "federation": {"algorithm": "hetlora"}},
     "(top level): adapter.rank_per_client.resources: 1 entries for federation.clients=2"),
    ({"adapter": {"rank_per_client": [2, 8]}, "federation": {"algorithm": "fedavg"}},
     "(top level): adapter.rank_per_client: federation.algorithm 'fedavg' cannot aggregate LoRA factors of "
     "different ranks; use one of: flexlora, flora, hetlora"),
    ({"federation": {"algorithm": "fedsp"}, "adapter": {"method": "lora"}},
     "(top level): adapter.method: fedsp exchanges prefix soft prompts; set adapter.method=prefix_tuning "
     "(got 'lora')"),
    ({"federation": {"algorithm": "flora"}, "adapter": {"method": "prefix_tuning"}},
     "(top level): adapter.method: flora aggregates LoRA factors; set adapter.method=lora (got 'prefix_tuning')"),
    ({"federation": {"algorithm": "fedmezo"}, "train": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
     "(top level): train.dp_sgd privatises backprop gradients; federation.algorithm 'fedmezo' trains by "
     "zeroth-order steps (remove train.dp_sgd)"),
    ({"federation": {"algorithm": "fedkseed"}, "train": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
     "(top level): train.dp_sgd privatises backprop gradients; federation.algorithm 'fedkseed' trains by "
     "zeroth-order steps (remove train.dp_sgd)"),
    ({"federation": {"algorithm": "fedkseed"}, "train": {"weight_decay": 0.1}},
     "(top level): train.weight_decay: fedkseed needs 0 (its model is rebuilt as θ0 − Σ G_k·z_k, which "
     "holds only for plain steps)"),
    ({"federation": {"algorithm": "fedkseed", "compression": {"up": {"method": "fp16"}}}},
     "(top level): federation.compression.up: fedkseed sends K scalars, not adapter tensors; compression "
     "does not apply (use none)"),
    ({"federation": {"algorithm": "fedkseed", "compression": {"down": {"method": "int8"}}}},
     "(top level): federation.compression.down: fedkseed sends K scalars, not adapter tensors; compression "
     "does not apply (use none)"),
    ({"federation": {"algorithm": "fedkseed", "options": {"pro": True}, **SECAGG}},
     "(top level): federation.secure_aggregation.enabled: FedKSeed-Pro (options.pro) learns its seed "
     "probabilities from each client's own scalars, which secure aggregation hides; use pro: false (plain "
     "FedKSeed needs only their sum)"),
    ({"federation": {"algorithm": "offsite", "options": {"adapter_bottom": 0, "adapter_top": 0}},
      "adapter": {"method": "full"}},
     "(top level): federation.options: offsite needs adapter_bottom + adapter_top >= 1"),
    ({"federation": {"algorithm": "offsite"}, "adapter": {"method": "lora"}},
     "(top level): adapter.method: offsite trains whole adapter layers of the emulator; set "
     "adapter.method=full (only those layers train)"),
    ({"federation": {"algorithm": "ffa_lora"}, "adapter": {"method": "ia3"}},
     "(top level): adapter.method: ffa_lora shares or freezes LoRA's A / B factors; use lora or qlora "
     "(got 'ia3')"),
    ({"federation": {"algorithm": "pfedgate"}, "train": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
     "(top level): train.dp_sgd: pfedgate trains each LoRA B scaled by its gate (a functional call), whose "
     "per-example gradients DP-SGD cannot compute; remove train.dp_sgd"),
]


@pytest.mark.parametrize("raw,message", REFUSED)
def test_each_recipe_check_refuses_in_these_exact_words(raw, message):
    from fedtune.config import load_recipe

    raw = {**raw, "federation": {"clients": 2, **raw.get("federation", {})}}
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert str(err.value) == LOADS + message


@pytest.mark.parametrize("raw", [
    {"federation": {"clients": 2, "secure_aggregation": {"enabled": True}}},   # 2 per round: the least
    {"adapter": {"r": 8, "rank_per_client": [8, 2]}, "federation": {"algorithm": "hetlora"}},  # r is allowed
    {"adapter": {"rank_per_client": {"ranks": [2, 8], "resources": [1.0, 2.0]}},
     "federation": {"algorithm": "hetlora"}},
    {"adapter": {"rank_per_client": {"ranks": [2, 8, 4]}}, "federation": {"algorithm": "flora"}},
    {"federation": {"algorithm": "fedkseed", "options": {"pro": True}}},
    {"federation": {"algorithm": "fedmezo"}},
    {"federation": {"algorithm": "offsite", "options": {"adapter_bottom": 1, "adapter_top": 0}},
     "adapter": {"method": "full"}},
    {"federation": {"algorithm": "offsite", "options": {"adapter_bottom": 0, "adapter_top": 2}},
     "adapter": {"method": "full"}},
    {"federation": {"algorithm": "fedsp"}, "adapter": {"method": "prefix_tuning"}},
    {"federation": {"algorithm": "flexlora"}, "adapter": {"rank_per_client": [2, 4]}},
    {"bench": {"algorithms": [{"name": "fedprox", "options": {"mu": 0.5}}]}},
    {"federation": {"algorithm": "pfedgate"}, "adapter": {"method": "qlora"}},
])
def test_recipes_at_the_edges_of_the_checks_load(raw):
    from fedtune.config import load_recipe

    recipe = load_recipe({**raw, "federation": {"clients": 2, **raw.get("federation", {})}})
    assert recipe.federation.algorithm == raw.get("federation", {}).get("algorithm", "fedavg")


def test_mixed_ranks_under_secure_aggregation_are_refused_in_words():
    """The check itself: a recipe never gets this far (the algorithms that mix ranks are refused
    secure aggregation earlier, by the federation's check)."""
    from types import SimpleNamespace

    from fedtune.algorithms.recipe_checks import rank_per_client

    recipe = SimpleNamespace(
        adapter=SimpleNamespace(method="lora", r=8, rank_per_client=[2, 8]),
        federation=SimpleNamespace(clients=2, algorithm="hetlora",
                                   secure_aggregation=SimpleNamespace(enabled=True)))
    with pytest.raises(ValueError) as err:
        rank_per_client(recipe)
    assert str(err.value) == ("adapter.rank_per_client: secure aggregation needs every update of one shape; "
                              "the clients' ranks differ")
    recipe.federation.secure_aggregation.enabled = False
    rank_per_client(recipe)
