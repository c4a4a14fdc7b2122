"""A recipe error caused by a command-line override names that argument, not the file's line."""

from __future__ import annotations

import pytest

from fedtune.cli import main
from fedtune.config import load_recipe
from fedtune.errors import RecipeError

RECIPE = """\
name: mine
train:
  local_steps: 4
  lr: 0.001
federation:
  clients: 3
"""


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(RECIPE)
    return path


def _error(source, overrides) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(source, overrides)
    return str(err.value)


def test_a_bad_override_value_names_the_argument_as_typed(recipe_file):
    message = _error(recipe_file, ["train.lr=abc"])
    assert "  command line: train.lr=abc: train.lr: Input should be a valid number" in message
    assert "line 4" not in message  # train.lr is on line 4 of the file, but that value was replaced


def test_the_last_of_repeated_overrides_is_named(recipe_file):
    message = _error(recipe_file, ["train.lr=1", "train.lr=fast"])
    assert "command line: train.lr=fast: train.lr:" in message and "train.lr=1" not in message


def test_an_error_in_a_file_value_still_names_its_line(recipe_file):
    recipe_file.write_text(RECIPE.replace("lr: 0.001", "lr: fast"))
    message = _error(recipe_file, ["federation.rounds=2"])
    assert f"{recipe_file}, line 4: train.lr:" in message and "command line" not in message


def test_a_section_check_names_the_override_and_the_file_line(recipe_file):
    # local_steps comes from the file (line 3 is inside `train:` on line 2), local_epochs from
    # the command line; the check is on the whole section
    message = _error(recipe_file, ["train.local_epochs=1"])
    assert (f"command line: train.local_epochs=1 (with {recipe_file}, line 2): train: "
            "set local_steps or local_epochs, not both") in message


def test_a_whole_section_given_on_the_command_line_is_named(recipe_file):
    message = _error(recipe_file, ["train={lr: -1}"])
    assert "command line: train={lr: -1}: train.lr: Input should be greater than 0" in message


def test_malformed_overrides_name_the_argument():
    assert "command line: federation.rounds: expected KEY.PATH=VALUE" in _error(None, ["federation.rounds"])
    assert "command line: train.lr.x=1: train.lr is a value, not a section" in _error(
        None, ["train.lr=1", "train.lr.x=1"])


def test_the_command_prints_it_and_exits_2(recipe_file, capsys):
    assert main(["run", str(recipe_file), "train.lr=abc"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "command line: train.lr=abc: train.lr:" in err
