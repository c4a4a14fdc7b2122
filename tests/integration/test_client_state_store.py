"""A deployed client keeps its persistent state (a personal adapter) in its own directory: a
restarted `fedtune client` (a fresh process: new Setup, new Client) continues with it exactly; a
damaged or foreign state file is refused with the path named."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from fedtune.config import load_recipe
from fedtune.errors import DeploymentError
from fedtune.runtime.client_store import load_client_state, save_client_state, state_path
from fedtune.runtime.deploy_client import _Loop, restore_state
from fedtune.runtime.setup import Setup
from fedtune.transport.codec import decode, encode
from fedtune.wire import Message, MessageKind


class FakeConnection:
    """The server's side of the stream: a fixed list of messages; every reply accepted."""

    address, connected = "loopback", True

    def __init__(self, messages: list[Message]):
        self.outgoing = [encode(m) for m in messages]
        self.pushed: list[Message] = []

    def messages(self):
        yield from self.outgoing

    def push(self, reply: bytes, timeout=None) -> str:
        self.pushed.append(decode(reply))
        return "accepted"


def _party(recipe):
    setup = Setup(recipe, Console(quiet=True))
    client = setup.clients.client("client_0")
    return setup, client


def test_a_restarted_client_continues_with_its_personal_adapter(tiny_recipe):
    recipe = load_recipe(tiny_recipe(federation__algorithm="ditto", federation__options={"lam": 0.5}))
    quiet = Console(quiet=True)
    setup, client = _party(recipe)
    store = restore_state(client, recipe, quiet)
    assert client.state == {} and not store.exists()
    global_state = setup.view.initial()
    fit = Message(MessageKind.FIT, 1, "server", "client_0", tensors=global_state, meta={"lr": 0.05})
    evaluate = Message(MessageKind.EVALUATE, 1, "server", "client_0", tensors=global_state)
    finish = Message(MessageKind.FINISH, 1, "server", "client_0")
    first = FakeConnection([fit, evaluate, finish])
    _Loop(first, client, recipe, quiet, store=store).run()
    assert store == state_path(recipe.output.dir, "client_0") and store.is_file()
    kept = {k: v.clone() for k, v in client.state.items()}
    assert kept and all(k.startswith("personal/") for k in kept)
    # the personal adapter never travelled: the update is shaped like the global adapter only
    update = next(m for m in first.pushed if m.kind == MessageKind.UPDATE)
    assert set(update.tensors) == set(global_state)
    before = next(m for m in first.pushed if m.kind == MessageKind.EVAL_RESULT)
    assert before.meta["metrics"]["personal_loss"] != before.meta["metrics"]["loss"]

    # "restart": a new process builds everything afresh and finds its state on disk
    _, again = _party(recipe)
    restore_state(again, recipe, quiet)
    assert again.state.keys() == kept.keys()
    for k in kept:
        assert torch.equal(again.state[k], kept[k])
    second = FakeConnection([evaluate, finish])
    _Loop(second, again, recipe, quiet, store=store).run()
    after = second.pushed[0].meta["metrics"]
    assert after["personal_loss"] == before.meta["metrics"]["personal_loss"]


def test_a_foreign_or_damaged_state_file_is_refused(tmp_path):
    path = tmp_path / "client_0" / "state.safetensors"
    save_client_state(path, {"personal/w": torch.ones(2)}, "ditto")
    assert torch.equal(load_client_state(path, "ditto")["personal/w"], torch.ones(2))
    with pytest.raises(DeploymentError, match="kept by algorithm 'ditto', this recipe runs 'fedrep'"):
        load_client_state(path, "fedrep")
    save_client_state(path, {"personal/w": torch.tensor([float("nan")])}, "ditto")
    with pytest.raises(DeploymentError, match="NaN or Inf"):
        load_client_state(path, "ditto")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DeploymentError, match=str(path)):
        load_client_state(path, "ditto")
