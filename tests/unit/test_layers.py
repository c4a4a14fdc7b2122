"""The package's shape stays as drawn: no import cycles or upward edges, no module outside
algorithms/ naming an algorithm, complete strategies, components checking their own sections."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from fedtune.algorithms import build_strategy, registry
from fedtune.algorithms.base import Strategy
from fedtune.config import load_recipe
from fedtune.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]


def _graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_packages_form_no_cycle_and_no_edge_points_up():
    graph = _graph()
    edges = graph.package_edges()
    assert ("runtime", "algorithms") in edges  # the scan sees imports at all
    assert graph.cycles(edges) == []
    assert graph.upward(edges) == []


def test_no_module_outside_algorithms_names_an_algorithm():
    assert _graph().by_name(branches_only=False) == []


def test_the_scan_finds_a_by_name_branch(tmp_path, monkeypatch):
    graph = _graph()
    pkg = tmp_path / "fedtune"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "runtime" / "x.py").write_text(
        '"""offsite in a docstring is fine."""\n'
        'def f(recipe):\n'
        '    if recipe.federation.algorithm == "offsite":\n'
        '        return 1\n'
        '    emulator = None\n'
        '    return emulator\n')
    monkeypatch.setattr(graph, "ROOT", pkg)
    assert graph.by_name(branches_only=True) == ["fedtune/runtime/x.py:3"]
    assert graph.by_name(branches_only=False) == ["fedtune/runtime/x.py:3", "fedtune/runtime/x.py:5",
                                                  "fedtune/runtime/x.py:6"]


def test_every_strategy_implements_the_whole_protocol_itself():
    wanted = {name for name, _ in inspect.getmembers(Strategy, inspect.isfunction)
              if not name.startswith("_")}
    assert {"round_metrics", "aggregate_fit", "min_updates"} <= wanted
    required = {"norm_bounding": {"max_norm": 1.0}}   # options without a default
    for name in registry():
        strategy = build_strategy(name, required.get(name, {}), 3)
        own = {m for m in wanted if m in vars(type(strategy))}
        assert own == wanted, f"{name}: {type(strategy).__name__} lacks {sorted(wanted - own)}"
        assert type(strategy).__mro__[1] is object, f"{name} inherits {type(strategy).__mro__[1]}"


@pytest.mark.parametrize("algorithm", ["fedmezo", "fedkseed"])
def test_the_zeroth_order_algorithms_refuse_dp_sgd_through_their_own_check(algorithm):
    with pytest.raises(RecipeError, match=f"train.dp_sgd privatises backprop gradients; "
                                          f"federation.algorithm '{algorithm}' trains by zeroth-order"):
        load_recipe("default", [f"federation.algorithm={algorithm}", "adapter.method=full",
                                "train.dp_sgd={noise_multiplier: 1.0}"])
    load_recipe("default", ["federation.algorithm=fedavg", "train.dp_sgd={noise_multiplier: 1.0}"])


def test_loading_never_rewrites_a_validated_section():
    recipe = load_recipe("default", ["adapter.method=QLoRA"])
    assert (recipe.adapter.method, recipe.model.quantization) == ("qlora", "4bit")
    assert load_recipe("default", ["adapter.method=lora"]).model.quantization == "none"
    assert load_recipe("default", ["adapter.method=qlora", "model.quantization=8bit"]).model.quantization == "8bit"
    assert load_recipe({}).train.local_steps == 10   # neither given: 10 steps
    assert load_recipe({"train": {"local_epochs": 2}}).train.local_steps is None
    humaneval = load_recipe("default", ["eval.humaneval={samples: 20}"]).eval.humaneval
    assert humaneval.k == [1, 10]
