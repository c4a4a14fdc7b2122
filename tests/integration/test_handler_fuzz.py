"""Fuzzing the handlers: whatever a peer sends, server and client reject it cleanly and go on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.algorithms import build_strategy
from fedtune.config import load_recipe
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import Simulation
from fedtune.track.rundir import RunDir
from fedtune.transport.codec import encode
from fedtune.transport.inprocess import InProcessTransport
from fedtune.wire import Message, MessageKind


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    recipe = load_recipe({
        "model": {"name": tiny_model_dir},
        "data": {"source": "synthetic", "synthetic": {"examples_per_category": 6}, "template": "compact",
                 "max_length": 128, "split": {"method": "iid"}, "test_fraction": 0.2, "val_fraction": 0.0},
        "adapter": {"r": 2}, "federation": {"clients": 2, "rounds": 1},
        "train": {"local_steps": 1, "batch_size": 2},
        "output": {"dir": str(out), "progress": False},
    })
    sim = Simulation(recipe)
    client = sim.clients["client_0"]
    server = Server(recipe, strategy=build_strategy("fedavg", {}, 2),
                    transport=InProcessTransport({n: c.handle_bytes for n, c in sim.clients.items()}),
                    clients=list(sim.clients), global_state=sim.slot.get(),
                    run_dir=RunDir.create(out, "fuzz"))
    return client, server


names = st.sampled_from(["server", "client_0", "client_1", "mallory", "x" * 40])
tensor = st.builds(lambda shape, fill: torch.full(shape, fill),
                   st.lists(st.integers(0, 3), max_size=2).map(tuple),
                   st.floats(allow_nan=True, allow_infinity=True, width=32))
messages = st.builds(
    Message, kind=st.sampled_from(list(MessageKind)), round=st.integers(0, 5), sender=names,
    receiver=names,
    tensors=st.dictionaries(st.sampled_from(["w", "base_model.model.x", "scaffold/c/w"]), tensor, max_size=2),
    meta=st.dictionaries(st.sampled_from(["lr", "n_examples", "metrics", "generate"]),
                         st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.floats(-1, 1),
                                   st.text(max_size=5), st.just({"train_loss": 1.0})), max_size=4),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_client_rejects_random_bytes(world, data):
    client, _ = world
    assert client.handle_bytes(data) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=messages)
def test_client_answers_any_decodable_message_without_crashing(world, msg):
    client, _ = world
    try:
        data = encode(msg)
    except Exception:  # not encodable (e.g. NaN meta): a peer could not send it either
        return
    reply = client.handle_bytes(data)
    # Only a well-formed FIT / EVALUATE from the server gets a real answer; anything else is
    # ignored or answered with an ERROR message, never an exception.
    assert reply is None or isinstance(reply, bytes)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replies=st.lists(messages, max_size=4))
def test_server_rejects_malformed_updates_and_keeps_going(world, replies):
    _, server = world
    rejected = []
    updates = server._accept_updates(1, ["client_0", "client_1"], replies, rejected)
    # Nothing here has the adapter's tensor names, so nothing may be accepted: each is refused.
    assert updates == []
    assert len(rejected) == len(replies)


@pytest.fixture(scope="module")
def emulator_package(four_layer_dir):
    from fedtune.algorithms.offsite_emulator import build_emulator
    from fedtune.algorithms.offsite_package import emulator_package
    from fedtune.config import ModelSection
    from fedtune.models.loading import load_base_model

    full, tokenizer = load_base_model(ModelSection(name=four_layer_dir))
    return emulator_package(build_emulator(full, 1, 1, 0.5), tokenizer)


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(-2, 2), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["format", "config", "prefix", "kept", "bottom", "top", "trainable"]),
       value=json_value,
       config_key=st.sampled_from(["hidden_size", "num_hidden_layers", "vocab_size", "model_type",
                                   "num_attention_heads", "rope_parameters", "tie_word_embeddings"]),
       config_value=json_value)
def test_a_malformed_emulator_package_is_refused_cleanly(emulator_package, key, value, config_key,
                                                          config_value):
    """What a client rebuilds from a server's package: a broken one is a ModelError, never a crash."""
    from fedtune.algorithms.offsite_package import emulator_from_package
    from fedtune.errors import ModelError

    meta, tensors = emulator_package
    for bad in ({**meta, key: value}, {**meta, "config": {**meta["config"], config_key: config_value}}):
        try:
            emulator, _ = emulator_from_package(bad, tensors, device=torch.device("cpu"),
                                                dtype=torch.float32)
        except ModelError:
            continue
        _assert_consistent(bad, tensors, emulator)


def _assert_consistent(meta, tensors, emulator) -> None:
    """What an accepted package must be: the format this fedtune reads, typed fields, an emulator
    with exactly the package's layers, adapter tensors and frozen weights."""
    from fedtune.algorithms.offsite_package import FORMAT, MODEL

    assert meta["format"] == FORMAT
    for name in ("bottom", "top"):
        assert type(meta[name]) is int and meta[name] >= 0
    assert all(type(i) is int for i in meta["kept"])
    assert emulator.prefix == meta["prefix"] and list(emulator.kept) == meta["kept"]
    assert (emulator.bottom, emulator.top) == (meta["bottom"], meta["top"])
    assert meta["bottom"] + meta["top"] <= len(meta["kept"])
    model = emulator.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(meta["trainable"])
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name.startswith(MODEL) and name[len(MODEL):] not in trainable:
            assert torch.equal(state[name[len(MODEL):]], tensor), name


def test_the_genuine_emulator_package_is_accepted_and_consistent(emulator_package):
    from fedtune.algorithms.offsite_package import emulator_from_package

    meta, tensors = emulator_package
    emulator, tokenizer = emulator_from_package(meta, tensors, device=torch.device("cpu"),
                                                dtype=torch.float32)
    _assert_consistent(meta, tensors, emulator)
    assert tokenizer.eos_token_id is not None


def test_a_package_whose_config_ties_weights_it_sends_apart_is_refused(emulator_package):
    """tie_word_embeddings would make the embedding silently become the package's lm_head."""
    from fedtune.algorithms.offsite_package import emulator_from_package
    from fedtune.errors import ModelError

    meta, tensors = emulator_package
    bad = {**meta, "config": {**meta["config"], "tie_word_embeddings": True}}
    with pytest.raises(ModelError, match="ties"):
        emulator_from_package(bad, tensors, device=torch.device("cpu"), dtype=torch.float32)
