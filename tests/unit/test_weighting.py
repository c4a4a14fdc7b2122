"""Update weights the server sets: claims capped (partition size, max_examples_per_client) and
federation.weighting, for every strategy, through the real message path (encoded replies)."""

from __future__ import annotations

import pytest
import torch

from fedtune.algorithms import build_strategy
from fedtune.config import load_recipe
from fedtune.runtime.server import Server
from fedtune.track.rundir import RunDir
from fedtune.transport.codec import decode, encode
from fedtune.transport.inprocess import InProcessTransport
from fedtune.wire import Message, MessageKind

# Two clients: A moves every value by +1 and has 10 examples, B by +4 and has 30.
DELTAS = {"A": 1.0, "B": 4.0}
REAL = {"A": 10, "B": 30}


def _endpoint(name: str, claim):
    def answer(data: bytes) -> bytes | None:
        msg = decode(data)
        if msg.kind != MessageKind.FIT:
            return None
        tensors = {k: torch.full_like(v, DELTAS[name]) for k, v in msg.tensors.items()}
        return encode(Message(MessageKind.UPDATE, msg.round, name, "server", tensors=tensors,
                              meta={"n_examples": claim, "metrics": {"train_loss": DELTAS[name]}}))
    return answer


def _round(tmp_path, claims: dict, *, algorithm="fedavg", options=None, known=None, **federation):
    recipe = load_recipe({"federation": {"clients": 2, "rounds": 1, "algorithm": algorithm,
                                         "options": options or {}, **federation},
                          "output": {"dir": str(tmp_path), "progress": False}})
    transport = InProcessTransport({c: _endpoint(c, claims[c]) for c in claims})
    server = Server(recipe, strategy=build_strategy(algorithm, options or {}, 2), transport=transport,
                    clients=list(claims), global_state={"w": torch.zeros(3)},
                    run_dir=RunDir.create(tmp_path, "r"), example_counts=known)
    server.run_round(1)
    return server


def _value(server) -> float:
    w = server.global_state["w"]
    assert torch.equal(w, torch.full_like(w, float(w[0])))
    return float(w[0])


def test_examples_and_uniform_weighting_differ_as_computed_by_hand(tmp_path):
    examples = _round(tmp_path / "e", REAL, known=REAL)
    assert _value(examples) == pytest.approx((10 * 1.0 + 30 * 4.0) / 40)  # 3.25
    uniform = _round(tmp_path / "u", REAL, known=REAL, weighting="uniform")
    assert _value(uniform) == pytest.approx((1.0 + 4.0) / 2)  # 2.5
    events = uniform.run_dir.events()
    fits = {e["client"]: e["values"] for e in events if e["kind"] == "fit"}
    assert fits["B"]["n_examples"] == 30 and fits["B"]["weight"] == 1
    summary = [e["values"] for e in events if e["kind"] == "round"][0]
    assert summary["train_loss"] == pytest.approx(2.5)  # the round's loss is weighted the same way


@pytest.mark.parametrize("algorithm, options", [
    ("fedavg", {"weighting": "examples"}), ("fedprox", {}), ("fedmezo", {}),
    ("fedavgm", {"server_lr": 1.0, "momentum": 0.0}),
])
def test_uniform_weighting_applies_to_every_strategy(tmp_path, algorithm, options):
    server = _round(tmp_path, REAL, algorithm=algorithm, options=options, known=REAL, weighting="uniform")
    assert _value(server) == pytest.approx(2.5)


def test_a_claim_above_the_partition_size_is_refused_in_simulation(tmp_path):
    server = _round(tmp_path, {"A": 10, "B": 10**15}, known=REAL)
    assert _value(server) == pytest.approx(1.0)  # only A's update: B did not take over
    assert server.rejected == 1
    reason = [e["values"]["reason"] for e in server.run_dir.events() if e["kind"] == "rejected"][0]
    assert "meta.n_examples must be in [1, 30]" in reason


def test_deployment_bounds_claims_by_max_examples_per_client(tmp_path):
    # B claims 10**15: refused; the adapter moves by A's update only.
    refused = _round(tmp_path / "a", {"A": 10, "B": 10**15})
    assert _value(refused) == pytest.approx(1.0) and refused.rejected == 1
    # At the bound a claim is taken as it is: (10·1 + 100·4) / 110.
    bounded = _round(tmp_path / "b", {"A": 10, "B": 100}, max_examples_per_client=100)
    assert _value(bounded) == pytest.approx(410 / 110) and bounded.rejected == 0
    above = _round(tmp_path / "c", {"A": 10, "B": 101}, max_examples_per_client=100)
    assert _value(above) == pytest.approx(1.0) and above.rejected == 1
    # 10**400 (the OverflowError) is refused the same way, not a crash.
    huge = _round(tmp_path / "d", {"A": 10, "B": 10**400})
    assert _value(huge) == pytest.approx(1.0) and huge.rejected == 1
