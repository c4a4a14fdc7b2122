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
