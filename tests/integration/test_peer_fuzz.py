"""Fuzzing what peers send, through the real message path (encoded, decoded, handled): arbitrary
JSON meta and tensor sets. No exception escapes the server's round, its evaluation or the client's
handler; every bad message is counted as rejected; what is accepted is sane.

A few hundred cases run by default; FEDTUNE_FUZZ_CASES sets how many per test, e.g. the long run
`FEDTUNE_FUZZ_CASES=10000 pytest tests/integration/test_peer_fuzz.py` (not in CI: minutes per test)."""

from __future__ import annotations

import json
import math
import os
from io import StringIO

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedtune.algorithms import build_strategy
from fedtune.config import load_recipe
from fedtune.errors import MessageError
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import Simulation
from fedtune.track.report import _pick, closing_table
from fedtune.track.rundir import RunDir
from fedtune.transport.codec import decode, encode
from fedtune.transport.inprocess import InProcessTransport
from fedtune.wire import Message, MessageKind

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 2**63, 10**15, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "x" * 300, "a\nb", "[bold]b[/bold]"]))
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
metric_names = st.one_of(st.sampled_from(["train_loss", "loss", "perplexity", "exact_match", "train_seconds",
                                          "steps", "lr", "dp_epsilon", "dp_delta", "n_examples", "attack"]),
                         st.text(max_size=70))
metrics = st.one_of(
    st.dictionaries(metric_names, json_value, max_size=5),
    st.integers(60, 70).map(lambda n: {f"m{i}": 1.0 for i in range(n)}),  # around the count bound
    json_value)
meta = st.one_of(
    st.fixed_dictionaries({}, optional={"n_examples": json_value | st.integers(-5, 2_000_000),
                                        "metrics": metrics, "lr": json_value, "generate": json_value,
                                        "error": json_value}),
    st.dictionaries(st.text(max_size=8), json_value, max_size=4))
dtypes = st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64, torch.bool])


def _tensor(shape, dtype, fill):
    return torch.full(shape, fill).to(dtype) if dtype != torch.bool else torch.zeros(shape, dtype=torch.bool)


any_tensors = st.dictionaries(
    st.sampled_from(["w", "v", "", "w/x", "secagg.weight"]),
    st.builds(_tensor, st.lists(st.integers(0, 4), max_size=3).map(tuple), dtypes,
              st.floats(allow_nan=True, allow_infinity=True, width=16)), max_size=3)


def _settings(default: int):
    n = int(os.environ.get("FEDTUNE_FUZZ_CASES", default))
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _sane(values: dict) -> bool:
    """Independently of the validators: every logged value is null, short text or a finite number."""
    for value in values.values():
        if value is None or (isinstance(value, str) and len(value) <= 200):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if abs(value) > 1e30 or not math.isfinite(value):
            return False
    return True


# ---------------------------------------------------------------- the server


class _Script:
    """client "A": answers whatever it is asked with the message under test (or nothing)."""

    def __init__(self):
        self.reply: Message | None = None

    def __call__(self, data: bytes) -> bytes | None:
        if self.reply is None:
            return None
        try:
            return encode(self.reply)
        except MessageError:  # the codec refuses it: no peer could send it either
            return None


@pytest.fixture(scope="module")
def server_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("server-fuzz")
    recipe = load_recipe({"federation": {"clients": 1, "rounds": 1, "max_examples_per_client": 1000},
                          "eval": {"clients": True}, "output": {"dir": str(out), "progress": False}})
    script = _Script()
    transport = InProcessTransport({"A": script})
    server = Server(recipe, strategy=build_strategy("fedavg", {}, 1), transport=transport, clients=["A"],
                    global_state={"w": torch.zeros(3)}, run_dir=RunDir.create(out, "s"))
    return server, script, transport


server_replies = st.builds(
    Message, kind=st.sampled_from([MessageKind.UPDATE, MessageKind.UPDATE, MessageKind.ERROR,
                                   MessageKind.EVAL_RESULT, MessageKind.FIT]),
    round=st.just(1), sender=st.just("A"), receiver=st.just("server"),
    tensors=st.one_of(any_tensors, st.floats(allow_nan=True, allow_infinity=True, width=32).map(
        lambda f: {"w": torch.full((3,), f)})),
    meta=meta)


def _server_case(server_world, reply: Message, phase: str) -> None:
    server, script, transport = server_world
    script.reply = reply
    server.global_state = {"w": torch.zeros(3)}  # each case starts afresh (finite sums stay finite)
    before, dropped = server.rejected, len(transport.rejected)
    server.run_dir.metrics_path.unlink(missing_ok=True)  # only this case's events (and no O(n²) reads)
    if phase == "fit":
        server.run_round(1)
    else:
        server.evaluate(1, final=False)
    new = server.run_dir.events()
    rejected = server.rejected - before + len(transport.rejected) - dropped
    if phase == "fit":
        updates = [e for e in new if e["kind"] == "round"][0]["values"]["updates"]
        delivered = 1 if script(b"") is not None else 0
        assert rejected + updates == delivered  # each delivered reply: accepted or counted
        assert all(math.isfinite(v) for v in server.global_state["w"].tolist())
    else:
        assert rejected <= 1
    for e in new:
        assert _sane({k: v for k, v in e["values"].items() if k not in ("reason", "scope", "secagg")})
        json.dumps(e, allow_nan=False)  # metrics.jsonl stays strict JSON
    if server.client_eval:
        summary = {"recipe": "r", "algorithm": "fedavg", "adapter": "lora", "rounds": 1, "clients": 1,
                   "per_client": {c: _pick(m) for c, m in server.client_eval.items()},
                   "bytes_down": 0, "bytes_up": 0, "adapter_parameters": 3, "adapter_bytes": 12,
                   "wall_seconds": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0}
        Console(file=StringIO()).print(closing_table(summary))
        json.dumps(summary, allow_nan=False)


@_settings(300)
@given(reply=server_replies, phase=st.sampled_from(["fit", "eval"]))
def test_server_round_and_evaluation_survive_any_reply(server_world, reply, phase):
    _server_case(server_world, reply, phase)


# ---------------------------------------------------------------- the client


@pytest.fixture(scope="module")
def client_world(tiny_model_dir, tmp_path_factory):
    recipe = load_recipe({
        "model": {"name": tiny_model_dir},
        "data": {"source": "synthetic", "synthetic": {"examples_per_category": 4}, "template": "compact",
                 "max_length": 64, "split": {"method": "iid"}, "test_fraction": 0.2, "val_fraction": 0.0},
        "adapter": {"r": 2}, "federation": {"clients": 2, "rounds": 1},
        "train": {"local_steps": 1, "batch_size": 2}, "eval": {"max_new_tokens": 1, "max_examples": 2},
        "output": {"dir": str(tmp_path_factory.mktemp("client-fuzz")), "progress": False},
    })
    sim = Simulation(recipe)
    client = sim.clients["client_0"]
    return client, client.down.pack(sim.slot.get())


client_messages = st.builds(
    lambda kind, round_, sender, right, tensors, meta: (kind, round_, sender, right, tensors, meta),
    st.sampled_from([MessageKind.FIT, MessageKind.FIT, MessageKind.EVALUATE, MessageKind.FINISH,
                     MessageKind.UPDATE, MessageKind.SECAGG_KEYS, MessageKind.SECAGG_FIT]),
    st.integers(0, 3), st.sampled_from(["server", "server", "client_1"]), st.booleans(), any_tensors, meta)


def _client_case(client_world, case) -> None:
    client, adapter = client_world
    kind, round_, sender, right, tensors, meta_ = case
    message = Message(kind, round_, sender, "client_0", tensors=adapter if right else tensors, meta=meta_)
    try:
        data = encode(message)
    except MessageError:
        return
    before = client.rejected
    reply = client.handle_bytes(data)  # must not raise
    refused = client.rejected - before
    if reply is None:
        assert refused == 1 or kind == MessageKind.FINISH
        return
    answer = decode(reply)
    assert answer.sender == "client_0" and answer.receiver == "server"
    if answer.kind == MessageKind.ERROR:
        assert refused == 1
    else:
        assert refused == 0
        assert answer.kind in (MessageKind.UPDATE, MessageKind.EVAL_RESULT)
        assert sender == "server" and right
        if answer.kind == MessageKind.UPDATE:  # only a sane learning rate was used
            lr = meta_["lr"]
            assert not isinstance(lr, bool) and isinstance(lr, (int, float)) and 0 < lr <= 100
        else:
            assert isinstance(meta_.get("generate", False), bool)


@_settings(200)
@given(case=client_messages)
def test_client_handler_survives_any_message(client_world, case):
    _client_case(client_world, case)
