"""A federation small enough to compute by hand: a model of one or two numbers, clients of a few examples.

The model has the vocabulary {0, 1}. At a position holding token t its logits are (0, w[t]), so an
example (t, y) -- input [t, y], label y on the second token -- has the loss
L = log(1 + e^{w_t}) − y·w_t and the gradient dL/dw_t = σ(w_t) − y. A client whose examples all
start with token t and a fraction f of which answer 1 takes, with SGD at rate η on its full batch,
the step w_t ← w_t − η·(σ(w_t) − f) (the loss is the mean over its labelled tokens).

Server and clients are the real ones (runtime/server.py, runtime/client.py) over the in-process
transport, sharing one model as in a simulation: only the model and the data are small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fedtune.algorithms import build_local, build_strategy, build_view
from fedtune.config import Recipe
from fedtune.data.prompts import TokenizedExample
from fedtune.models.adapters import AdapterSlot
from fedtune.runtime.client import Client, ClientDataset
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import SimulatedClientStates
from fedtune.track.rundir import RunDir
from fedtune.train.local import LocalTrainer
from fedtune.transport.inprocess import InProcessTransport


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def loss(w: float, f: float) -> float:
    """Mean loss of examples on one token, a fraction f of which answer 1, at logit w."""
    return math.log1p(math.exp(w)) - f * w


def sgd(w: float, f: float, lr: float, steps: int = 1) -> float:
    """w after `steps` full-batch SGD steps on examples answering 1 with frequency f."""
    for _ in range(steps):
        w = w - lr * (sigmoid(w) - f)
    return w


class LogitModel(torch.nn.Module):
    """Logits (0, w[t]) at a position holding token t."""

    def __init__(self, w: list[float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float32))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False):
        one = self.w[input_ids]
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(one), one], dim=-1))


class LoraLogitModel(torch.nn.Module):
    """Logits (0, (B·A)[0, t]) at token t, with A of shape (r, 2) and B of shape (1, r): parameter
    names `proj.lora_A.default.weight` / `proj.lora_B.default.weight`, as peft names them."""

    def __init__(self, a: list[list[float]], b: list[list[float]]):
        super().__init__()
        self.proj = torch.nn.Module()
        self.proj.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor(a))})
        self.proj.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor(b))})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False):
        w = (self.proj.lora_B["default"] @ self.proj.lora_A["default"])[0]
        one = w[input_ids]
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(one), one], dim=-1))


def examples(token: int, answers: list[int]) -> list[TokenizedExample]:
    """One example per answer: input [token, y], labelled on y."""
    return [TokenizedExample([token, y], [-100, y]) for y in answers]


@dataclass
class Federation:
    server: Server
    clients: dict[str, Client]
    model: torch.nn.Module
    slot: AdapterSlot
    transport: InProcessTransport
    run_dir: RunDir

    def round(self, round_: int) -> dict[str, torch.Tensor]:
        self.server.run_round(round_)
        return self.server.global_state

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.run_dir.events() if kind is None or e["kind"] == kind]


def recipe(algorithm: str, n_clients: int, *, options: dict | None = None, lr: float = 1.0,
           steps: int = 1, batch_size: int = 64, tmp: Path, **sections: Any) -> Recipe:
    """A recipe for the tiny federation: SGD, full batches, no clipping, no evaluation."""
    data: dict[str, Any] = {
        "seed": 5,
        "federation": {"algorithm": algorithm, "options": options or {}, "clients": n_clients,
                       "rounds": 3},
        "adapter": {"method": "full"},
        "train": {"local_steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "sgd",
                  "max_grad_norm": None},
        "eval": {"at_start": False, "every": 0, "clients": False},
        "output": {"dir": str(tmp), "progress": False, "checkpoint_every": 0},
    }
    for key, value in sections.items():  # federation__compression={...}, transport={...}
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = {**node[parts[-1]], **value}
        else:
            node[parts[-1]] = value
    return Recipe.model_validate(data)


def federation(recipe_: Recipe, model: torch.nn.Module, train: dict[str, list[TokenizedExample]],
               *, tmp: Path, evaluator: Any = None, test: dict[str, tuple[list, list]] | None = None,
               endpoints: dict[str, Any] | None = None, evaluate_global: Any = None,
               run_dir: RunDir | None = None) -> Federation:
    """The real server and clients of `recipe_` on `model`; `train` maps client name -> examples.

    `endpoints` replaces a client's transport endpoint (bytes -> bytes | None), e.g. to misbehave.
    """
    fed = recipe_.federation
    slot = AdapterSlot(model)
    trainer = LocalTrainer(model, recipe_.train, pad_id=0, device=torch.device("cpu"))
    view = build_view(fed.algorithm, fed.options, slot)
    clients = {}
    for name, exs in train.items():
        tests, raw = (test or {}).get(name, ([], []))
        clients[name] = Client(
            name, ClientDataset(train=exs, test=tests, test_raw=raw), slot=slot, trainer=trainer,
            evaluator=evaluator, seed=recipe_.seed, local=build_local(fed.algorithm, fed.options),
            view=view, compression=(fed.compression.up.codec(), fed.compression.down.codec()),
        )
    handlers = {name: c.handle_bytes for name, c in clients.items()}
    handlers.update(endpoints or {})
    transport = InProcessTransport(handlers)
    run_dir = run_dir or RunDir.create(tmp, "run")
    server = Server(
        recipe_, strategy=build_strategy(fed.algorithm, fed.options, fed.clients),
        transport=transport, clients=list(clients), global_state=view.initial(), run_dir=run_dir,
        client_state=SimulatedClientStates(clients), evaluate_global=evaluate_global,
    )
    server._wall = lambda: 0.0
    return Federation(server, clients, model, slot, transport, run_dir)
