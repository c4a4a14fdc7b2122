"""What an algorithm changes in how each party (the server or a client process) is set up and
finishes: the model each side holds, what a client downloads first, server-side work between
rounds, the final save, the summary and the closing table's rows.

Every process builds one Party per run from the recipe (`AlgorithmSpec.party`), right after it
loads the base model and before it attaches an adapter. Most algorithms change none of this and
use `StandardParty`; offsite-tuning (`algorithms/offsite.py`) is the example that changes most.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fedtune.wire import Message

State = dict[str, torch.Tensor]
# (scope, prediction records): writes predictions/round_NNNN_<scope>.jsonl for this evaluation
WritePredictions = Callable[[str, list[dict[str, Any]]], None]


@dataclass
class GlobalEvaluation:
    """One global evaluation on the server: its inputs and what the trained model measured."""

    state: State                          # the global state evaluated (already in the model)
    tokenized: list                       # the global test examples, tokenized
    raw: list                             # and as examples
    generate: bool                        # whether answers are generated this time
    metrics: dict[str, Any]               # the trained model's figures
    records: list[dict[str, Any]]         # and its answers (prediction records)
    write: WritePredictions               # writes other answers under another scope


class Party(Protocol):
    """The per-process hooks of an algorithm (the defaults: `StandardParty`)."""

    attaches_adapter: bool
    """Whether the recipe's adapter is attached to the model (False: the model's own trainable
    tensors are what travels, as the offsite emulator's adapter layers)."""

    def server_model(self, model: torch.nn.Module, tokenizer: Any, console: Any) -> torch.nn.Module:
        """The model owner's process (server, simulation): the model the federation trains, built
        from the base model (offsite: the emulator); the base model stays with this Party."""
        ...

    def downloads(self) -> dict[str, Callable[[str], Message]]:
        """Server side: what a client downloads before it joins, by resource name (-> the message
        for a given client). Simulation charges each client one download of each."""
        ...

    def client_downloads(self) -> tuple[str, ...]:
        """Client side: the resources to download before joining (the names of `downloads`)."""
        ...

    def client_model(self, messages: dict[str, Message], recipe: Any) -> tuple[torch.nn.Module, Any, str]:
        """Client side: (model, tokenizer, a few words on it) built from the downloads (by name),
        instead of loading the recipe's model."""
        ...

    def keep(self, run_dir: Path, resume: bool) -> None:
        """Keep what a resumed run must reuse in the run directory (or reuse what was kept)."""
        ...

    def evaluate_global(self, ev: GlobalEvaluation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The server's global figures and the answers kept as its predictions (default: those of
        the trained model)."""
        ...

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model whose multiple-choice accuracy the server reports."""
        ...

    def after_round(self, round_: int, global_state: State) -> State:
        """Server-side work between rounds, after aggregation: the global state to continue with."""
        ...

    def state_dict(self) -> State:
        """Tensors of this party to checkpoint (with the server's), so a resumed run is exact."""
        ...

    def load_state_dict(self, state: State) -> None: ...

    def save(self, state: State, directory: Path) -> bool:
        """Save the final model itself (True), or leave it to the adapter's standard save (False)."""
        ...

    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        """Keys added to summary.json (`final`: the last global evaluation)."""
        ...

    def report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """How the closing table shows this run (summary.json's `report`; track/report.py):
        `labels` ({"final": ..., "clients": ...}) and extra `rows` ({"evaluated_on", "model",
        "metrics"}); {} for the standard table."""
        ...


class StandardParty:
    """Every side holds the recipe's model with the adapter attached; nothing else happens."""

    attaches_adapter = True

    def server_model(self, model: torch.nn.Module, tokenizer: Any, console: Any) -> torch.nn.Module:
        return model

    def downloads(self) -> dict[str, Callable[[str], Message]]:
        return {}

    def client_downloads(self) -> tuple[str, ...]:
        return ()

    def client_model(self, messages: dict[str, Message], recipe: Any) -> tuple[torch.nn.Module, Any, str]:
        raise NotImplementedError("this algorithm downloads nothing before a client joins")

    def keep(self, run_dir: Path, resume: bool) -> None:
        return None

    def evaluate_global(self, ev: GlobalEvaluation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return ev.metrics, ev.records

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def after_round(self, round_: int, global_state: State) -> State:
        return global_state

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)[:3]}")

    def save(self, state: State, directory: Path) -> bool:
        return False

    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        return {}

    def report(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {}


def standard_party(options: Any, recipe: Any) -> Party:
    return StandardParty()


def side_model_summary(key: str, prefix: str, info: dict[str, Any], final: dict[str, Any] | None
                       ) -> dict[str, Any]:
    """summary.json's entry for an algorithm whose clients hold another model than the global one
    (offsite's emulator, FedSP's auxiliary model): the server's `info`, and under `<prefix>final`
    the final metrics reported for the clients' model (those named `<prefix>...`)."""
    clients = {k.removeprefix(prefix): v for k, v in (final or {}).items() if k.startswith(prefix)}
    return {key: {**info, f"{prefix}final": clients}}


def side_model_report(summary: dict[str, Any], key: str, prefix: str, model: str,
                      labels: dict[str, str]) -> dict[str, Any]:
    """The report's extra row for the clients' model of `side_model_summary`, and the labels."""
    if key not in summary:
        return {}
    metrics = summary[key].get(f"{prefix}final")
    n = (summary.get("final") or {}).get("n_examples", "")
    rows = [{"evaluated_on": "global test", "model": model, "metrics": metrics, "examples": n}] if metrics else []
    return {"labels": labels, "rows": rows}

