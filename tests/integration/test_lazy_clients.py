"""Costs that follow the clients who work: a simulation builds (tokenizes, constructs) a client
only when it is first sampled, and that changes nothing in the results."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import fedtune
from fedtune.runtime import client_factory, hosting
from fedtune.runtime.server import sample_clients
from fedtune.runtime.setup import Setup


def _final(summary: dict) -> dict[str, torch.Tensor]:
    run_dir = Path(summary["final_adapter"]).parent
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / "global.safetensors"))


def test_a_thousand_client_split_builds_only_the_sampled_clients(tiny_recipe, monkeypatch):
    built: list[str] = []
    tokenized: list[str] = []
    real_client = client_factory.ClientFactory.client

    def counting_client(self, name):
        built.append(name)
        return real_client(self, name)

    real_setup_tokenize = Setup.tokenize

    def counting_tokenize(self, label, examples):
        tokenized.append(label)
        return real_setup_tokenize(self, label, examples)

    monkeypatch.setattr(client_factory.ClientFactory, "client", counting_client)
    monkeypatch.setattr(Setup, "tokenize", counting_tokenize)
    recipe = tiny_recipe(
        seed=5,
        data__synthetic__examples_per_category=250, data__split={"method": "iid"},
        data__test_fraction=0.05,
        federation={"clients": 1000, "rounds": 2, "clients_per_round": 3},
        train={"local_steps": 1, "batch_size": 1, "lr": 0.01},
        eval={"every": 0, "at_start": False, "clients": False, "max_examples": 4, "max_new_tokens": 1},
    )
    summary = fedtune.run(recipe)
    run_dir = Path(summary["final_adapter"]).parent

    # The rounds' clients, drawn by hand with the server's seeded rule.
    names = [f"client_{i}" for i in range(1000)]
    sampled = {c for r in (1, 2) for c in sample_clients(names, 3, 5, r)}
    assert 3 <= len(sampled) <= 6
    assert sorted(set(built)) == sorted(sampled) and len(built) == len(sampled)  # each built once
    client_labels = [t for t in tokenized if t.startswith("client_")]
    assert len(client_labels) == 3 * len(sampled)        # train, test, val of each sampled client
    assert {t.split()[0] for t in client_labels} == sampled
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {e["client"] for e in events if e["kind"] == "fit"} == sampled
    # The split summary still reports every client.
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["clients"]) == 1000


def test_lazy_and_eager_creation_give_the_same_final_adapter(tiny_recipe, monkeypatch):
    recipe = tiny_recipe(federation={"clients": 4, "rounds": 2, "clients_per_round": 2},
                         eval={"every": 0, "at_start": False, "clients": False, "max_examples": 4,
                               "max_new_tokens": 1})
    lazy = _final(fedtune.run(recipe))

    def eager(setup):
        clients = {name: setup.clients.client(name) for name in setup.data.clients}
        return hosting.InProcessHost(clients)

    monkeypatch.setitem(hosting.ENGINES, "inprocess", eager)
    recipe["output"]["dir"] = recipe["output"]["dir"] + "-eager"
    eager_state = _final(fedtune.run(recipe))
    assert set(lazy) == set(eager_state)
    for name in lazy:
        assert torch.equal(lazy[name], eager_state[name]), name
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in lazy.values())


def test_client_evaluation_visits_a_fixed_subset(tiny_recipe):
    recipe = tiny_recipe(federation={"clients": 6, "rounds": 1},
                         eval={"every": 1, "at_start": False, "clients": True, "client_subset": 2,
                               "max_examples": 4, "max_new_tokens": 1})
    summary = fedtune.run(recipe)
    run_dir = Path(summary["final_adapter"]).parent
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round: dict[int, set[str]] = {}
    for e in events:
        if e["kind"] == "eval" and e["client"] is not None:
            per_round.setdefault(e["round"], set()).add(e["client"])
    names = [f"client_{i}" for i in range(6)]
    expected = set(sample_clients(names, 2, 3, 0))
    assert per_round == {1: expected}
    assert len(expected) == 2
