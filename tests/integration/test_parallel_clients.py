"""federation.parallel_clients: K clients' local steps through one pass of the shared base, each
client's result what it would be alone (dropout 0), and a fallback where it cannot batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import fedtune
from fedtune.config import load_recipe
from fedtune.runtime import batched as batched_module
from fedtune.runtime.batched import BatchedFits
from fedtune.runtime.hosting import InProcessHost
from fedtune.runtime.setup import Setup
from fedtune.train import multi_lora
from fedtune.transport.codec import decode, encode
from fedtune.wire import Message, MessageKind


def _recipe(tiny_recipe, name: str, algorithm: str, options: dict, k: int, **train):
    return tiny_recipe(
        output__name=name, adapter__dropout=0.0,
        federation={"clients": 3, "rounds": 2, "algorithm": algorithm, "options": options,
                    "parallel_clients": k},
        train={"local_steps": 2, "batch_size": 2, "lr": 0.5, "max_grad_norm": 0.5, "optimizer": "sgd",
               **train},
        eval={"every": 0, "at_start": False, "clients": False, "max_examples": 4, "max_new_tokens": 1},
    )


def _fits(setup: Setup, host: InProcessHost, seed: int) -> list[tuple[str, bytes]]:
    """A round-1 FIT for every client: the initial adapter and, for SCAFFOLD, a random server c."""
    gen = torch.Generator().manual_seed(seed)
    adapter = setup.view.initial()
    out = []
    for name in host.names():
        client = host.client(name)
        extra = {k: torch.randn(spec.shape, generator=gen).to(spec.dtype) * 0.1
                 for k, spec in client.local.server_tensor_specs(client._specs).items()}
        msg = Message(MessageKind.FIT, 1, "server", name,
                      tensors={**client.down.pack(adapter), **extra}, meta={"lr": 0.5})
        out.append((name, encode(msg)))
    return out


@pytest.mark.parametrize(("algorithm", "options", "train", "group_cost"), [
    ("fedavg", {}, {}, None), ("fedprox", {"mu": 5.0}, {}, None), ("scaffold", {}, {}, None),
    ("fedavg", {}, {"gradient_checkpointing": True, "grad_accum": 2}, None),
    # sub-batches free: every micro-batch split by length, clients spread unevenly over them
    ("fedavg", {}, {"batch_size": 3}, 0), ("fedprox", {"mu": 5.0}, {"batch_size": 3}, 0),
    ("scaffold", {}, {"batch_size": 3}, 0),
    ("fedavg", {}, {"gradient_checkpointing": True, "grad_accum": 2, "batch_size": 3}, 0),
])
def test_each_batched_client_replies_what_it_would_alone(tiny_recipe, monkeypatch, algorithm, options,
                                                         train, group_cost):
    splits: list[list[list[int]]] = []
    prefixed: list[int] = []   # sub-batches whose shared prompt prefix ran once per client
    real_prefixed = multi_lora.MultiLoRA._prefixed_losses
    monkeypatch.setattr(multi_lora.MultiLoRA, "_prefixed_losses",
                        lambda self, *a: prefixed.append(a[-1]) or real_prefixed(self, *a))
    if group_cost is not None:
        monkeypatch.setattr(multi_lora, "CPU_GROUP_COST", group_cost)
        real_groups = multi_lora.length_groups
        monkeypatch.setattr(multi_lora, "length_groups",
                            lambda lengths, cost: splits.append(real_groups(lengths, cost)) or splits[-1])
    recipe = load_recipe(_recipe(tiny_recipe, "x", algorithm, options, 3, **train))
    setup = Setup(recipe, Console(quiet=True))
    alone = InProcessHost.lazy(list(setup.data.clients), setup.clients.client)
    together = InProcessHost.from_setup(setup)
    assert together.batched is not None and together.batched.refusal is None
    answered: list[int] = []
    real = together.batched.answer
    together.batched.answer = lambda group: answered.append(len(group)) or real(group)
    fits = _fits(setup, alone, seed=1)   # before any training: the shared model holds the initial adapter
    a = dict(alone.deliver(iter(fits)))
    b = dict(together.deliver(iter(fits)))
    assert answered == [3]   # the three clients trained as one group
    if group_cost is not None:   # several sub-batches per micro-batch, most mixing clients
        assert splits and all(len(groups) > 1 for groups in splits), splits
    # sub-batches with several rows of a client run their shared prompt prefix once per client
    # (with free passes, always); never with gradient checkpointing (layers recomputed unrouted)
    if train.get("gradient_checkpointing"):
        assert prefixed == []
    elif group_cost == 0:
        assert prefixed and min(prefixed) > 0, prefixed
    assert list(a) == list(b) == alone.names()
    for name in a:
        ma, mb = decode(a[name]), decode(b[name])
        assert ma.kind == mb.kind == MessageKind.UPDATE, (ma.meta, mb.meta)
        assert set(ma.tensors) == set(mb.tensors)
        for key in ma.tensors:
            torch.testing.assert_close(mb.tensors[key], ma.tensors[key], rtol=1e-5, atol=1e-7)
        assert any(float(t.abs().sum()) > 0 for t in ma.tensors.values())   # it did train
        assert mb.meta["n_examples"] == ma.meta["n_examples"]
        for figure in ("steps", "examples_seen"):
            assert mb.meta["metrics"][figure] == ma.meta["metrics"][figure]
        assert mb.meta["metrics"]["train_loss"] == pytest.approx(ma.meta["metrics"]["train_loss"], rel=1e-5)
        # the persistent state (SCAFFOLD's control variate) is the same too
        for key, value in alone.client(name).state.items():
            torch.testing.assert_close(together.client(name).state[key], value, rtol=1e-5, atol=1e-7)


def test_a_batched_run_ends_where_the_sequential_run_ends(tiny_recipe, monkeypatch):
    groups: list[int] = []
    real_answer = batched_module.BatchedFits.answer
    monkeypatch.setattr(batched_module.BatchedFits, "answer",
                        lambda self, group: groups.append(len(group)) or real_answer(self, group))

    def final(summary: dict) -> dict[str, torch.Tensor]:
        run_dir = Path(summary["final_adapter"]).parent
        return load_file(str(sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "global.safetensors"))

    sequential = fedtune.run(_recipe(tiny_recipe, "seq", "fedavg", {}, 1))
    assert groups == []
    together = fedtune.run(_recipe(tiny_recipe, "par", "fedavg", {}, 3))
    assert groups == [3, 3]   # each round's three clients as one group
    a, b = final(sequential), final(together)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    # the server's training time is the sum of the clients' shares: at most the rounds' wall time
    assert 0 < together["train_seconds"] <= together["wall_seconds"]
    run_dir = Path(together["final_adapter"]).parent
    fits = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "fit" for e in fits) == 6


def test_unbatchable_local_work_runs_sequentially_and_says_so(tiny_recipe, caplog):
    recipe = load_recipe(_recipe(tiny_recipe, "x", "fedavg", {}, 3, packing=True))
    with caplog.at_level(logging.WARNING, logger="fedtune.batched"):
        setup = Setup(recipe, Console(quiet=True))
        host = InProcessHost.from_setup(setup)
    assert isinstance(host.batched, BatchedFits) and "packing" in (host.batched.refusal or "")
    assert any("one after another" in r.getMessage() and "packing" in r.getMessage() for r in caplog.records)
    replies = dict(host.deliver(iter(_fits(setup, host, seed=2))))
    assert all(decode(r).kind == MessageKind.UPDATE for r in replies.values())


def test_an_attacked_client_trains_alone(tiny_recipe, caplog):
    raw = _recipe(tiny_recipe, "x", "fedavg", {}, 3)
    raw["federation"]["attack"] = {"clients": ["client_1"], "kind": "scale", "factor": 2.0}
    setup = Setup(load_recipe(raw), Console(quiet=True))
    host = InProcessHost.from_setup(setup)
    groups: list[list[str]] = []
    real = host.batched.answer
    host.batched.answer = lambda group: groups.append([c.name for c, _ in group]) or real(group)
    with caplog.at_level(logging.WARNING, logger="fedtune.batched"):
        replies = dict(host.deliver(iter(_fits(setup, host, seed=3))))
    assert groups == [["client_0"], ["client_2"]]   # client_1 (attacked) between them, on its own
    assert list(replies) == ["client_0", "client_1", "client_2"]
    assert any("AttackedLocal" in r.getMessage() for r in caplog.records)


def test_clients_with_different_local_work_train_in_separate_groups(tiny_recipe, monkeypatch):
    raw = _recipe(tiny_recipe, "x", "fedavg", {}, 3)
    raw["train"] = {"local_epochs": 0.5, "batch_size": 2, "lr": 0.5, "optimizer": "sgd"}
    raw["data"]["split"] = {"method": "quantity", "alpha": 0.5}
    recipe = load_recipe(raw)
    setup = Setup(recipe, Console(quiet=True))
    alone = InProcessHost.lazy(list(setup.data.clients), setup.clients.client)
    together = InProcessHost.from_setup(setup)
    from fedtune.train.local import steps_for

    steps = [steps_for(recipe.train, len(alone.client(n).data.train)) for n in alone.names()]
    assert len(set(steps)) > 1, steps   # the split gives the clients different local work
    trained: list[int] = []
    real = together.batched.engine.train
    monkeypatch.setattr(together.batched.engine, "train", lambda jobs: trained.append(len(jobs)) or real(jobs))
    fits = _fits(setup, alone, seed=4)
    a = dict(alone.deliver(iter(fits)))
    b = dict(together.deliver(iter(fits)))
    expected_groups = sorted(steps.count(s) for s in set(steps))
    assert sorted(trained) == expected_groups
    for name in a:
        ma, mb = decode(a[name]), decode(b[name])
        assert mb.meta["metrics"]["steps"] == ma.meta["metrics"]["steps"]
        for key in ma.tensors:
            torch.testing.assert_close(mb.tensors[key], ma.tensors[key], rtol=1e-5, atol=1e-7)
