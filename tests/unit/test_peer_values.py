"""Checks of values from a peer (runtime/peer_values.py) and a closing table that survives any value."""

from __future__ import annotations

import math
from io import StringIO

import pytest
from rich.console import Console

from fedtune.errors import MessageError
from fedtune.runtime import peer_values as pv
from fedtune.track.report import closing_table


def test_good_metrics_pass_unchanged():
    got = pv.metrics({"train_loss": 1.25, "steps": 3, "attack": "scale", "dp_epsilon": None,
                      "exact_match": 0.5, "lr": 0.01})
    assert got == {"train_loss": 1.25, "steps": 3, "attack": "scale", "dp_epsilon": None,
                   "exact_match": 0.5, "lr": 0.01}
    assert isinstance(got["steps"], int) and isinstance(got["train_loss"], float)


@pytest.mark.parametrize("value, fragment", [
    ({"train_loss": "much"}, "train_loss must be a number, got str"),
    ({"train_loss": None}, "train_loss must be a number, got null"),
    ({"train_loss": math.nan}, "must be finite"),
    ({"loss": math.inf}, "must be finite"),
    ({"loss": 1e31}, "must be finite with |x| <= 1e+30"),
    ({"steps": 10**400}, "out of range"),
    ({"train_seconds": -1.0}, "train_seconds must be in [0.0, None]"),
    ({"exact_match": 1.5}, "exact_match must be in [0.0, 1.0]"),
    ({"dp_delta": 2}, "dp_delta must be in [0.0, 1.0]"),
    ({"x": True}, "x must be a number, a short text or null, got bool"),
    ({"x": [1]}, "got list"),
    ({"x": {"y": 1}}, "got dict"),
    ({"x": "a" * 201}, "at most 200 characters"),
    ({"x": "line\nbreak"}, "printable text"),
    ({"": 1}, "a name must be printable text of 1..64"),
    ({"k" * 65: 1}, "1..64"),
    ({f"m{i}": i for i in range(65)}, "65 entries, more than 64"),
    ([1, 2], "must be an object, got list"),
])
def test_bad_metrics_are_refused_with_the_key_named(value, fragment):
    with pytest.raises(MessageError) as info:
        pv.metrics(value)
    assert fragment in str(info.value)


def test_counts_and_rates():
    assert pv.count(30, "n", low=1, high=30) == 30
    for bad in (0, 31, True, 3.0, "3", None):
        with pytest.raises(MessageError):
            pv.count(bad, "n", low=1, high=30)
    with pytest.raises(MessageError, match="a 401-digit number"):
        pv.count(10**400, "n", high=5)
    assert pv.learning_rate(0.01) == 0.01 and pv.learning_rate(2) == 2.0
    for bad in (0, -0.1, math.inf, math.nan, 101, True, "0.1", None, 10**400):
        with pytest.raises(MessageError):
            pv.learning_rate(bad)
    assert pv.flag(True, "g") is True
    with pytest.raises(MessageError):
        pv.flag("no", "g")


def test_values_read_back_from_a_checkpoint_fall_back_to_defaults():
    assert pv.stored_count(7) == 7 and pv.stored_count("7") == 0 and pv.stored_count(-1) == 0
    assert pv.stored_count(10**400) == 0 and pv.stored_count(True) == 0
    assert pv.stored_seconds(1.5) == 1.5 and pv.stored_seconds(math.nan) == 0.0
    assert pv.stored_seconds(10**400) == 0.0 and pv.stored_seconds("x", 2.0) == 2.0


def test_error_text_is_short_and_printable():
    assert pv.error_text("a\nb" + "c" * 1000) == "a?b" + "c" * 297
    assert pv.error_text({"x": 1}) == "{'x': 1}"


def test_the_closing_table_shows_a_dash_for_any_value_it_cannot_format():
    summary = {
        "recipe": "r", "algorithm": "fedavg", "adapter": "lora", "rounds": 1, "clients": 3,
        "initial": None, "final": {"loss": 1.5, "perplexity": 4.48, "n_examples": 8},
        "per_client": {"client_0": {"loss": "low", "perplexity": 10**400, "n_examples": "many"},
                       "client_1": {"loss": math.nan, "exact_match": True, "n_examples": 10**400},
                       "client_2": {"loss": 0.25, "exact_match": 0.5, "n_examples": 3}},
        "bytes_down": 10, "bytes_up": 10, "adapter_parameters": 5, "adapter_bytes": 20,
        "wall_seconds": 1.0, "train_seconds": 0.5, "eval_seconds": 0.1,
    }
    out = StringIO()
    Console(file=out, width=200).print(closing_table(summary))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.getvalue().splitlines() if "test" in line}
    assert rows["client_0 test"] == ["federated", "-", "-", "-", ""]
    assert rows["client_1 test"] == ["federated", "-", "-", "-", ""]
    assert rows["client_2 test"] == ["federated", "0.2500", "-", "50.0%", "3"]
    assert rows["global test"] == ["federated", "1.5000", "4.48", "-", "8"]


def test_a_checkpoint_with_hostile_counters_restores_with_defaults(tmp_path):
    import torch

    from fedtune.algorithms import build_strategy
    from fedtune.config import load_recipe
    from fedtune.runtime.server import Server
    from fedtune.track.rundir import Checkpoint, RunDir
    from fedtune.transport.inprocess import InProcessTransport

    recipe = load_recipe({"federation": {"clients": 1, "rounds": 3},
                          "output": {"dir": str(tmp_path), "progress": False}})
    server = Server(recipe, strategy=build_strategy("fedavg", {}, 1), transport=InProcessTransport({}),
                    clients=["A"], global_state={"w": torch.zeros(2)}, run_dir=RunDir.create(tmp_path, "r"))
    info = {"rejected": "x", "missing": 10**400, "train_seconds": math.nan, "eval_seconds": 10**400,
            "wall_seconds": 3.5, "initial": [1, 2], "traffic": server.transport.traffic.state()}
    start = server.restore(Checkpoint(1, {"w": torch.ones(2)}, {}, info))
    assert start == 2 and server.rejected == 0 and server.missing == 0 and server.initial is None
    assert server.timings.train == 0.0 and server.timings.eval == 0.0 and server.timings.wall_before == 3.5
    assert torch.equal(server.global_state["w"], torch.ones(2))
