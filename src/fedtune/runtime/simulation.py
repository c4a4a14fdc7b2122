"""Simulation: one server and N virtual clients in one process, sharing ONE copy of the base model.

Each client's turn swaps its tensors into the shared model (AdapterSlot); messages between server
and clients are really encoded, so byte counts and checks are those of a deployment.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.algorithms import build_strategy
from fedtune.config import Recipe, load_recipe
from fedtune.data.federated import FederatedData, build_federated_data, format_split_table
from fedtune.data.prompts import tokenize_examples
from fedtune.errors import RunDirError
from fedtune.eval.evaluator import Evaluator
from fedtune.models.adapters import AdapterSlot, attach_adapter
from fedtune.models.loading import load_base_model
from fedtune.runtime.client import Client, ClientDataset
from fedtune.runtime.server import Server, ServerResult, state_nbytes, state_numel
from fedtune.seeding import derive_seed, seed_everything
from fedtune.track.report import closing_table, make_summary
from fedtune.track.reporter import ConsoleReporter, NullReporter, quiet_libraries
from fedtune.track.rundir import RunDir
from fedtune.train.local import LocalTrainer
from fedtune.transport.inprocess import InProcessTransport

log = logging.getLogger("fedtune.simulation")


class Simulation:
    """Everything a simulated run needs, built once from a recipe."""

    def __init__(self, recipe: Recipe, console: Console | None = None):
        self.recipe = recipe
        self.console = console or Console(quiet=not recipe.output.progress)
        quiet_libraries()
        seed_everything(recipe.seed)

        self.data: FederatedData = build_federated_data(
            recipe.data, recipe.federation.clients, recipe.seed
        )
        self.console.print(format_split_table(self.data))

        model, self.tokenizer = load_base_model(recipe.model)
        torch.manual_seed(derive_seed(recipe.seed, "adapter-init"))
        self.model = attach_adapter(model, recipe.adapter)
        self.model.eval()
        self.slot = AdapterSlot(self.model)
        self.device = next(self.model.parameters()).device

        self.tokenize_report: dict[str, Any] = {}
        self.test = self._tokenize("global test", self.data.test)
        self.evaluator = Evaluator(
            self.model, self.tokenizer, recipe.eval, template=recipe.data.template,
            max_length=recipe.data.max_length, device=self.device,
        )
        trainer = LocalTrainer(self.model, recipe.train, self.tokenizer.pad_token_id, self.device)
        self.clients: dict[str, Client] = {}
        for name, part in self.data.clients.items():
            dataset = ClientDataset(
                train=self._tokenize(f"{name} train", part.train),
                test=self._tokenize(f"{name} test", part.test),
                test_raw=part.test,
            )
            self.clients[name] = Client(
                name, dataset, slot=self.slot, trainer=trainer, evaluator=self.evaluator,
                seed=recipe.seed, max_message_bytes=recipe.transport.max_message_bytes,
            )

    def _tokenize(self, label: str, examples):
        d = self.recipe.data
        tokenized, report = tokenize_examples(
            examples, self.tokenizer, template=d.template, max_length=d.max_length,
            truncation=d.truncation,
        )
        self.tokenize_report[label] = report.as_dict()
        if report.truncated or report.dropped:
            log.warning("%s: %d of %d examples truncated, %d dropped (data.max_length=%d)",
                        label, report.truncated, report.total, report.dropped, d.max_length)
        return tokenized

    def evaluate_global(self, state, generate: bool) -> dict[str, Any]:
        self.slot.set(state)
        test_raw = self.data.test
        cap = self.recipe.eval.max_examples
        tokenized = self.test[:cap] if cap else self.test
        raw = test_raw[:cap] if cap else test_raw
        return self.evaluator.evaluate(tokenized, raw, with_generation=generate)

    def run(self, run_dir: RunDir, resume: bool = False) -> dict[str, Any]:
        recipe = self.recipe
        self.run_dir = run_dir
        run_dir.write_json("split.json", {**self.data.summary(), "tokenization": self.tokenize_report})
        reporter = ConsoleReporter(self.console) if recipe.output.progress else NullReporter()
        transport = InProcessTransport(
            {name: c.handle_bytes for name, c in self.clients.items()},
            max_message_bytes=recipe.transport.max_message_bytes,
            on_delivery=reporter.client_done,
        )
        server = Server(
            recipe, strategy=build_strategy(recipe.federation.algorithm, recipe.federation.options),
            transport=transport, clients=list(self.clients), global_state=self.slot.get(),
            run_dir=self.run_dir, evaluate_global=self.evaluate_global, reporter=reporter,
        )
        start_round = 1
        if resume:
            ckpt = self.run_dir.latest_checkpoint()
            if ckpt is not None:
                start_round = server.restore(ckpt)
                self.run_dir.truncate_events_after(ckpt.round)
            else:
                self.run_dir.truncate_events_after(-1)
            self.console.print(f"resuming {self.run_dir.path} at round {start_round}")
        try:
            result = server.run(start_round)
        finally:
            reporter.close()
        return self._finish(server, result)

    def _finish(self, server: Server, result: ServerResult) -> dict[str, Any]:
        self.slot.set(result.global_state)
        self.model.save_pretrained(self.run_dir.final_dir)
        self.tokenizer.save_pretrained(self.run_dir.final_dir)
        summary = make_summary(
            self.recipe, result, traffic=server.transport.traffic, wall_seconds=server.wall_seconds(),
            adapter_parameters=state_numel(result.global_state),
            adapter_bytes=state_nbytes(result.global_state), run_dir=self.run_dir.path,
        )
        self.run_dir.write_json("summary.json", summary)
        self.console.print(closing_table(summary))
        self.console.print(f"run directory: {self.run_dir.path}")
        return summary


def _run_name(recipe: Recipe) -> str:
    return recipe.output.name or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(recipe: Recipe | str | Path | dict | None = None, overrides: list[str] | None = None,
        *, resume: str | Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run a federated fine-tuning simulation and return its summary (also in summary.json).

    `recipe` is a Recipe, a built-in recipe name, a YAML path or a dict; `overrides` are
    `key.path=value` strings. With `resume`, the run in that directory continues from its last
    checkpoint, with the recipe saved there.
    """
    if resume is not None:
        if recipe is not None or overrides:
            raise RunDirError("--resume continues a run with its saved recipe; give no recipe or overrides")
        run_dir = RunDir.open(resume)
        if (run_dir.path / "summary.json").exists():
            raise RunDirError(f"{run_dir.path} has finished already (summary.json exists)")
        loaded = load_recipe(run_dir.recipe_path)
        return Simulation(loaded, console).run(run_dir, resume=True)
    loaded = load_recipe(recipe, overrides)
    explicit = loaded.output.name is not None
    if explicit:  # refuse an existing named directory before minutes of set-up
        RunDir.check_free(Path(loaded.output.dir) / loaded.output.name)
    simulation = Simulation(loaded, console)
    run_dir = RunDir.create(loaded.output.dir, _run_name(loaded), explicit=explicit)
    run_dir.write_recipe(loaded.to_yaml())
    return simulation.run(run_dir)
