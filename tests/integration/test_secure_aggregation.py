"""Secure aggregation in simulated runs: the masked sum equals plain FedAvg, dropouts, honesty."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_recipe
from fedtune.privacy.fixedpoint import codec_of
from fedtune.runtime.simulation import Simulation
from fedtune.track.rundir import RunDir
from fedtune.transport.codec import decode, encode
from fedtune.transport.inprocess import InProcessTransport
from fedtune.wire import Message, MessageKind

SECURE = {"enabled": True}


def _fast(tiny_recipe, **overrides):
    base = {"eval__every": 0, "eval__at_start": False, "eval__clients": False,
            "federation__rounds": 2}
    return tiny_recipe(**{**base, **overrides})


def _checkpoint(run_dir: Path, round_: int | None = None) -> dict[str, torch.Tensor]:
    rounds = sorted((run_dir / "checkpoints").glob("round_*"))
    path = rounds[-1] if round_ is None else run_dir / "checkpoints" / f"round_{round_:06d}"
    return load_file(str(path / "global.safetensors"))


def _events(run_dir: Path, kind: str) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["kind"] == kind]


def _simulate(recipe_dict: dict, name: str, drop: dict[str, set[str]] | None = None,
              seen: list[Message] | None = None) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """Run a simulation; `drop` maps clients to message kinds whose replies get lost (the client
    did the work, the answer never arrived); `seen` collects every reply the server received.
    Returns the summary, the run directory and the initial global adapter."""
    recipe = load_recipe(recipe_dict)
    sim = Simulation(recipe)
    initial = {k: v.clone() for k, v in sim.slot.get().items()}
    for client, kinds in (drop or {}).items():
        handle = sim.clients[client].handle_bytes

        def lossy(data: bytes, handle=handle, kinds=kinds) -> bytes | None:
            reply = handle(data)
            return None if decode(data).kind.value in kinds else reply

        sim.clients[client].handle_bytes = lossy
    if seen is not None:
        original = InProcessTransport.collect

        def recording(self, round, expected, timeout=None):
            replies = original(self, round, expected, timeout)
            seen.extend(replies)
            return replies

        InProcessTransport.collect = recording
    try:
        run_dir = RunDir.create(recipe.output.dir, name, explicit=True)
        run_dir.write_recipe(recipe.to_yaml())
        summary = sim.run(run_dir)
    finally:
        if seen is not None:
            InProcessTransport.collect = original
    return summary, run_dir.path, initial


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("frac_bits", [24, 6])
def test_masked_aggregate_equals_plain_fedavg_within_the_fixed_point_bound(tiny_recipe, frac_bits):
    plain, plain_dir, initial = _simulate(_fast(tiny_recipe, federation__rounds=1), "plain")
    seen: list[Message] = []
    recipe = _fast(tiny_recipe, federation__rounds=1,
                   federation__secure_aggregation={**SECURE, "frac_bits": frac_bits})
    secure, secure_dir, _ = _simulate(recipe, "secure", seen=seen)

    expected, got = _checkpoint(plain_dir), _checkpoint(secure_dir)
    assert _max_diff(expected, initial) > 1e-3  # the round really moved the adapter
    # Codes are within 2^-frac_bits of each w_i Δ_i, so the mean is within n 2^-frac_bits / Σ w_i;
    # float32 adds rounding of the global adapter's size.
    total_weight = sum(e["values"]["n_examples"] for e in _events(plain_dir, "fit"))
    load = codec_of(load_recipe(recipe).federation.secure_aggregation)
    bound = load.error_bound(3) / total_weight + 4 * 2.0**-24 * max(
        float(t.abs().max()) for t in expected.values())
    diff = _max_diff(expected, got)
    assert diff <= bound
    if frac_bits == 6:  # coarse codes: the error is visible, and still within the bound
        assert diff > 1e-6

    # Honest server: every tensor it received was a masked int64 vector; no example count, no loss.
    replies = [m for m in seen if m.kind != MessageKind.EVAL_RESULT]
    assert {m.kind for m in replies} == {MessageKind.SECAGG_ADVERT, MessageKind.SECAGG_SHARES,
                                         MessageKind.SECAGG_MASKED, MessageKind.SECAGG_REVEAL}
    assert all(t.dtype == torch.int64 for m in replies for t in m.tensors.values())
    assert not any("n_examples" in json.dumps(m.meta) or "train_loss" in json.dumps(m.meta)
                   for m in replies)
    # The revealed weighted mean loss is the plain run's (weighted by examples).
    plain_round = _events(plain_dir, "round")[0]["values"]
    secure_round = _events(secure_dir, "round")[0]["values"]
    assert secure_round["train_loss"] == pytest.approx(
        plain_round["train_loss"], abs=load.error_bound(3) / total_weight + 1e-6)
    assert secure_round["secagg"]["survivors"] == 3 and secure_round["updates"] == 3
    # Every protocol message was counted: more bytes than the plain round, both ways.
    assert secure["bytes_up"] > plain["bytes_up"] and secure["bytes_down"] > plain["bytes_down"]
    assert secure_round["bytes_up"] == secure["bytes_up"]
    fits = _events(secure_dir, "fit")
    assert len(fits) == 3 and all(e["values"]["up"] > 0 and e["values"]["down"] > 0 for e in fits)


def test_two_rounds_with_fedadam_match_the_plain_run(tiny_recipe):
    options = {"federation__algorithm": "fedadam", "federation__options": {"server_lr": 0.01}}
    _, plain_dir, _ = _simulate(_fast(tiny_recipe, **options), "plain")
    _, secure_dir, _ = _simulate(
        _fast(tiny_recipe, **options, federation__secure_aggregation=SECURE), "secure")
    assert _max_diff(_checkpoint(plain_dir), _checkpoint(secure_dir)) < 1e-5


@pytest.mark.parametrize(("lost", "in_sum"), [
    ("secagg_fit", False),      # vanished while training: never part of the masks
    ("secagg_routed", False),   # shared its keys, then vanished: its pairwise masks are rebuilt
    ("secagg_unmask", True),    # its masked input arrived: it is in the sum
])
def test_a_dropped_client_leaves_the_round_equal_to_fedavg_of_the_rest(tiny_recipe, lost, in_sum):
    recipe = _fast(tiny_recipe, federation__secure_aggregation=SECURE)
    secure, secure_dir, _ = _simulate(recipe, "secure", drop={"client_1": {lost}})
    reference_drop = None if in_sum else {"client_1": {"fit"}}
    _, plain_dir, _ = _simulate(_fast(tiny_recipe), "plain", drop=reference_drop)

    assert _max_diff(_checkpoint(plain_dir), _checkpoint(secure_dir)) < 1e-5
    rounds = [e["values"] for e in _events(secure_dir, "round")]
    assert [r["updates"] for r in rounds] == [3 if in_sum else 2] * 2
    assert [r["secagg"]["dropped"] for r in rounds] == [[] if in_sum else ["client_1"]] * 2
    assert secure["missing_updates"] == (0 if in_sum else 2)
    if not in_sum:
        reasons = {e["values"]["reason"] for e in _events(secure_dir, "no_update")}
        step = {"secagg_fit": "advert", "secagg_routed": "masked"}[lost]
        assert reasons == {f"secure aggregation: not in the sum (no valid answer at the {step} step)"}


def test_below_the_threshold_the_round_leaves_the_adapter_unchanged(tiny_recipe, caplog):
    recipe = _fast(tiny_recipe, federation__rounds=1, federation__secure_aggregation=SECURE)
    lost = {"secagg_routed"}
    secure, secure_dir, initial = _simulate(recipe, "secure", drop={"client_1": lost, "client_2": lost})
    assert _max_diff(_checkpoint(secure_dir), initial) == 0
    assert "secure aggregation stopped" in caplog.text and "threshold is 2 of 3" in caplog.text
    assert secure["missing_updates"] == 3
    rounds = [e["values"] for e in _events(secure_dir, "round")]
    assert rounds[0]["updates"] == 0 and rounds[0]["train_loss"] is None


def test_a_client_that_requires_secure_aggregation_refuses_a_plain_fit(tiny_recipe):
    recipe = load_recipe(_fast(tiny_recipe, federation__secure_aggregation=SECURE))
    sim = Simulation(recipe)
    client = sim.clients["client_0"]
    client.secagg.require(recipe.federation.secure_aggregation)
    fit = Message(MessageKind.FIT, 1, "server", "client_0", tensors=sim.slot.get(), meta={"lr": 0.01})
    reply = decode(client.handle_bytes(encode(fit)))
    assert reply.kind == MessageKind.ERROR and "plain FIT refused" in reply.meta["error"]
    # Steps of a round it is not in are refused too, cleanly.
    keys = Message(MessageKind.SECAGG_KEYS, 1, "server", "client_0", meta={"public_keys": {}})
    reply = decode(client.handle_bytes(encode(keys)))
    assert reply.kind == MessageKind.ERROR and "no secure-aggregation round 1" in reply.meta["error"]


def test_local_dp_sgd_budgets_are_still_reported_per_client(tiny_recipe):
    recipe = _fast(tiny_recipe, federation__rounds=1, federation__secure_aggregation=SECURE,
                   train__dp_sgd={"noise_multiplier": 1.0})
    summary, _, _ = _simulate(recipe, "dp")
    assert summary["missing_updates"] == 0
    assert sorted(summary["dp_sgd"]["clients"]) == ["client_0", "client_1", "client_2"]
    assert summary["dp_sgd"]["max_epsilon"] > 0


def test_a_malformed_masked_input_is_rejected_and_its_sender_unmasked_as_dropped(tiny_recipe):
    recipe = load_recipe(_fast(tiny_recipe, federation__secure_aggregation=SECURE))
    sim = Simulation(recipe)
    initial = {k: v.clone() for k, v in sim.slot.get().items()}
    handle = sim.clients["client_0"].handle_bytes

    def tampering(data: bytes) -> bytes | None:
        raw = handle(data)
        reply = decode(raw) if raw is not None else None
        if reply is None or reply.kind != MessageKind.SECAGG_MASKED:
            return raw
        name = sorted(reply.tensors)[0]
        tensors = {**reply.tensors, name: reply.tensors[name].reshape(-1)[:-1].clone()}
        return encode(Message(reply.kind, reply.round, reply.sender, reply.receiver, tensors=tensors))

    sim.clients["client_0"].handle_bytes = tampering
    run_dir = RunDir.create(recipe.output.dir, "tampered", explicit=True)
    summary = sim.run(run_dir)
    rounds = [e["values"] for e in _events(run_dir.path, "round")]
    assert [r["secagg"]["dropped"] for r in rounds] == [["client_0"], ["client_0"]]
    assert summary["rejected_replies"] == 2 and summary["missing_updates"] == 2
    reasons = [e["values"]["reason"] for e in _events(run_dir.path, "rejected")]
    assert all("secagg masked input of 'client_0'" in r and "shape" in r for r in reasons)
    assert _max_diff(_checkpoint(run_dir.path), initial) > 1e-3  # the others' rounds went on
