"""Recipe loading, overrides and validation errors that name the key, line and what is allowed."""

from __future__ import annotations

import re

import pytest

from fedtune.config import Recipe, builtin_recipes, load_recipe, parse_override
from fedtune.errors import RecipeError


def test_default_recipe_loads_and_round_trips_through_yaml(tmp_path):
    recipe = load_recipe()
    assert recipe.name == "default" and recipe.federation.algorithm == "fedavg"
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_every_builtin_recipe_is_valid():
    assert "default" in builtin_recipes()
    for path in builtin_recipes().values():
        assert isinstance(load_recipe(path), Recipe)


def test_overrides_are_typed_by_yaml():
    r = load_recipe(None, ["federation.rounds=3", "train.lr=1e-3", "adapter.target_modules=[q_proj]",
                           "eval.max_examples=null", "output.name=abc"])
    assert r.federation.rounds == 3 and r.train.lr == pytest.approx(1e-3)
    assert r.adapter.target_modules == ["q_proj"] and r.output.name == "abc"


@pytest.mark.parametrize("text", ["federation.rounds", "=3", "federation.rounds.x=3"])
def test_malformed_overrides_are_refused(text):
    with pytest.raises(RecipeError, match=f"command line: {re.escape(text)}: "):
        load_recipe(None, [text])


def test_parse_override_splits_on_the_first_equals_sign():
    assert parse_override("data.template=a=b") == (["data", "template"], "a=b")


def test_unknown_key_names_file_line_path_and_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nfederation:\n  clients: 3\n  roundz: 5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}, line 4: federation.roundz: unknown key" in text
    assert "rounds" in text and "clients_per_round" in text


def test_wrong_type_names_the_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"line 2: train.lr: .*'fast'"):
        load_recipe(path)


def test_errors_from_overrides_say_so():
    with pytest.raises(RecipeError, match=r"command line: federation.rounds=0: federation.rounds"):
        load_recipe(None, ["federation.rounds=0"])


def test_more_clients_per_round_than_clients_is_impossible():
    with pytest.raises(RecipeError, match=r"clients_per_round \(6\) must be at most federation.clients \(4\)"):
        load_recipe(None, ["federation.clients=4", "federation.clients_per_round=6"])


@pytest.mark.parametrize("overrides,pattern", [
    (["train.local_epochs=1", "train.local_steps=5"], "local_steps or local_epochs"),
    (["federation.algorithm=fedmagic"], "unknown algorithm 'fedmagic'; allowed: .*fedavg"),
    (["adapter.method=superlora"], "unknown peft method 'superlora'; allowed: .*lora"),
    (["federation.options={weighting: by_mood}"], "federation.options.weighting"),
    (["federation.options={momentum: 0.9}"], r"federation.options.momentum: unknown key"),
    (["federation.sample_fraction=1.5"], "sample_fraction"),
    (["model.device=tpu"], "model.device"),
    (["data.format=custom"], "data.fields"),
    (["data.val_fraction=0.7"], "data.val_fraction"),
])
def test_impossible_values_fail_at_load_time(overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(None, overrides)


def test_local_steps_default_when_neither_is_given():
    assert load_recipe({"train": {}}).train.local_steps == 10
    r = load_recipe({"train": {"local_epochs": 2}})
    assert r.train.local_steps is None and r.train.local_epochs == 2


def test_clients_per_round_from_count_or_fraction():
    assert load_recipe({"federation": {"clients": 10}}).federation.per_round() == 10
    assert load_recipe({"federation": {"clients": 10, "clients_per_round": 3}}).federation.per_round() == 3
    assert load_recipe({"federation": {"clients": 10, "sample_fraction": 0.25}}).federation.per_round() == 2


def test_unknown_recipe_lists_the_builtin_ones():
    with pytest.raises(RecipeError, match="built-in: .*default"):
        load_recipe("no-such-recipe")


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(path)
