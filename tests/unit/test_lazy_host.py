"""InProcessHost builds a client when first needed; resumed state waits for its client."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedtune.runtime.hosting import InProcessHost
from fedtune.transport.codec import encode
from fedtune.wire import Message, MessageKind


def _host():
    built: list[str] = []

    def build(name):
        built.append(name)
        return SimpleNamespace(name=name, state={}, predictions_dir=None,
                               data=SimpleNamespace(train=[0] * (int(name[-1]) + 1)),
                               handle_bytes=lambda data: b"reply-" + name.encode())

    return InProcessHost.lazy(["c0", "c1", "c2"], build), built


def test_nothing_is_built_until_needed_and_counts_are_exact():
    host, built = _host()
    counts = host.example_counts()
    assert built == [] and list(counts) == ["c0", "c1", "c2"] and len(host.clients) == 3
    assert counts["c2"] == 3 and built == ["c2"]      # reading a count builds that client only
    assert counts.get("nobody") is None and built == ["c2"]


def test_finish_to_a_client_never_built_is_dropped_unbuilt():
    host, built = _host()
    finish = encode(Message(MessageKind.FINISH, 3, "server", "c1"))
    fit = encode(Message(MessageKind.FIT, 3, "server", "c0", meta={"lr": 0.1}))
    replies = list(host.deliver(iter([("c1", finish), ("c0", fit)])))
    assert replies == [("c1", None), ("c0", b"reply-c0")]
    assert built == ["c0"]


def test_resumed_state_of_an_unbuilt_client_is_kept_and_handed_over():
    host, built = _host()
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    host.load_state_dict({"c1/ci/w": x, "c2/ci/w": y})
    assert built == []
    assert set(host.state_dict()) == {"c1/ci/w", "c2/ci/w"}   # a checkpoint now loses nothing
    host.write_predictions_to("/tmp/p")
    client = host.client("c1")
    assert torch.equal(client.state["ci/w"], x) and client.predictions_dir == "/tmp/p"
    state = host.state_dict()
    assert torch.equal(state["c1/ci/w"], x) and torch.equal(state["c2/ci/w"], y)
