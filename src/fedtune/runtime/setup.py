"""What every process of a federation builds from a recipe: data, ONE base model with its adapter,
the local trainer and the evaluator. Simulation, deployed server and deployed client share it, so
they compute the same things from the same recipe and seed."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.algorithms import build_local, build_view
from fedtune.algorithms.attacks import AttackedLocal, backdoor_metrics, poison_examples
from fedtune.config import Recipe
from fedtune.data.examples import Example
from fedtune.data.federated import FederatedData, build_federated_data, format_split_table
from fedtune.data.prompts import TokenizedExample, tokenize_examples
from fedtune.eval.evaluator import Evaluator
from fedtune.eval.predictions import (
    predictions_path,
    predictions_table,
    read_predictions,
    write_predictions,
)
from fedtune.eval.text_metrics import RULES
from fedtune.models.adapters import AdapterSlot, attach_adapter, save_adapter
from fedtune.models.loading import load_base_model
from fedtune.runtime.client import Client, ClientDataset
from fedtune.runtime.server import Server, ServerResult
from fedtune.seeding import derive_seed, seed_everything
from fedtune.track.report import closing_table, make_summary
from fedtune.track.reporter import quiet_libraries
from fedtune.track.rundir import RunDir
from fedtune.train.distributed import data_parallel
from fedtune.train.local import LocalTrainer

log = logging.getLogger("fedtune.setup")


class Setup:
    def __init__(self, recipe: Recipe, console: Console | None = None,
                 data: FederatedData | None = None, base: tuple[Any, Any] | None = None):
        """`base`: a (model, tokenizer) to use instead of loading `recipe.model`; a deployed
        offsite-tuning client passes the emulator the server shipped (its trainable layers set)."""
        self.recipe = recipe
        self.console = console or Console(quiet=not recipe.output.progress)
        quiet_libraries()
        seed_everything(recipe.seed)

        self.data = data or build_federated_data(recipe.data, recipe.federation.clients, recipe.seed)
        self.console.print(format_split_table(self.data))

        model, self.tokenizer = base or load_base_model(recipe.model)
        self.offsite = None
        offsite = recipe.federation.algorithm == "offsite"  # clients train an emulator, never the model
        if offsite and base is None:  # the model owner: build the emulator from the full model
            from fedtune.runtime.offsite import OffsiteServer

            self.offsite = OffsiteServer(model, self.tokenizer, recipe, self.console)
            model = self.offsite.emulator.model
        # The initial adapter depends only on the recipe seed: every party builds the same one.
        torch.manual_seed(derive_seed(recipe.seed, "adapter-init"))
        self.model = model if offsite else attach_adapter(model, recipe.adapter)
        self.model.eval()
        self.slot = AdapterSlot(self.model)
        fed = recipe.federation
        self.view = build_view(fed.algorithm, fed.options, self.slot)  # before any training
        self.device = next(self.model.parameters()).device
        self.tokenize_report: dict[str, Any] = {}
        self.evaluator = Evaluator(
            self.model, self.tokenizer, recipe.eval, template=recipe.data.template,
            max_length=recipe.data.max_length, device=self.device,
        )
        self.trainer = LocalTrainer(self.model, recipe.train, self.tokenizer.pad_token_id, self.device,
                                    parallel=data_parallel())  # DDP under torchrun / accelerate
        self._test: list[TokenizedExample] | None = None
        self.predictions_dir: Path | None = None   # the run directory's predictions/ (server side)
        self.last_predictions: Path | None = None  # the latest global predictions file
        self._mc_items: list | None = None
        if "rouge_l" in recipe.eval.metrics:  # a missing package fails now, not after training
            from fedtune.eval.errors import require_module

            require_module("rouge_score.rouge_scorer", "rouge-score", "the rouge_l metric")

    def tokenize(self, label: str, examples: list[Example]) -> list[TokenizedExample]:
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

    def client(self, name: str) -> Client:
        """The client `name` of the recipe's split, on the shared model."""
        part = self.data.clients[name]
        fed = self.recipe.federation
        attack = fed.attack if name in fed.attack.clients else None
        train = part.train
        if attack is not None and attack.kind == "backdoor":
            train = poison_examples(train, trigger=attack.trigger, target=attack.target,
                                    fraction=attack.poison_fraction,
                                    seed=derive_seed(self.recipe.seed, "poison", name))
        dataset = ClientDataset(
            train=self.tokenize(f"{name} train", train),
            test=self.tokenize(f"{name} test", part.test),
            test_raw=part.test,
            val=self.tokenize(f"{name} val", part.val),
        )
        local = build_local(fed.algorithm, fed.options)
        if attack is not None and attack.kind in ("scale", "sign_flip", "nan", "inf"):
            local = AttackedLocal(local, attack.kind, attack.factor)
        elif attack is not None and attack.kind == "backdoor" and attack.boost != 1.0:
            local = AttackedLocal(local, "scale", attack.boost)  # model replacement
        return Client(name, dataset, slot=self.slot, trainer=self.trainer, evaluator=self.evaluator,
                      seed=self.recipe.seed, local=local, view=self.view,
                      compression=(fed.compression.up.codec(), fed.compression.down.codec()),
                      max_message_bytes=self.recipe.transport.max_message_bytes)

    def evaluate_global(self, state, generate: bool, round_: int | None = None) -> dict[str, Any]:
        """Evaluate a global adapter on the global test set (the server's job); the answers go to
        predictions/round_NNNN_global.jsonl, multiple choice (`mc_accuracy`) on `eval.mc`."""
        if self._test is None:
            self._test = self.tokenize("global test", self.data.test)
        self.view.load(state)
        cap = self.recipe.eval.max_examples
        tokenized = self._test[:cap] if cap else self._test
        raw = self.data.test[:cap] if cap else self.data.test
        records: list[dict[str, Any]] = []
        metrics = self.evaluator.evaluate(tokenized, raw, with_generation=generate, predictions=records)
        if self.offsite is not None:  # the plugged-in full model, and the emulator as emulator_*
            self._write_predictions(round_, "global_emulator", records)
            records = []
            metrics = self.offsite.evaluate(state, metrics, tokenized, raw, generate, predictions=records)
        path = self._write_predictions(round_, "global", records)
        self.last_predictions = path or self.last_predictions
        if "mc_accuracy" in self.recipe.eval.metrics:
            metrics.update(self.mc_accuracy())
        attack = self.recipe.federation.attack
        if generate and attack.kind == "backdoor" and attack.clients:
            metrics.update(backdoor_metrics(self.evaluator.generate, raw, trigger=attack.trigger,
                                            target=attack.target))
        return metrics

    def _write_predictions(self, round_: int | None, scope: str, records: list[dict[str, Any]]) -> Path | None:
        if not records or self.predictions_dir is None or round_ is None:
            return None
        return write_predictions(predictions_path(self.predictions_dir, round_, scope), records)

    def mc_accuracy(self) -> dict[str, Any]:
        """Multiple choice on `eval.mc` with the adapter in the slot (the full model's, offsite)."""
        from fedtune.eval.multiple_choice import load_mc_items, mc_accuracy

        if self._mc_items is None:
            self._mc_items = load_mc_items(self.recipe.eval.mc)
        model = self.offsite.full if self.offsite is not None else self.model
        with torch.no_grad():
            found = mc_accuracy(model, self.tokenizer, self._mc_items, self.device)
        return {"mc_accuracy": found["mc_accuracy"]} if found.get("n_items") else {}

    def keep_emulator(self, run_dir: RunDir, resume: bool) -> None:
        """Offsite-tuning server: keep the distilled emulator core with the run (a resumed run
        reuses it). Nothing to do otherwise."""
        if self.offsite is not None:
            self.offsite.keep(Path(run_dir.path), resume)

    def write_split(self, run_dir: RunDir) -> None:
        """split.json in the run directory, which also becomes where predictions are written."""
        self.predictions_dir = Path(run_dir.path) / "predictions"
        if self._test is None:
            self._test = self.tokenize("global test", self.data.test)
        run_dir.write_json("split.json", {**self.data.summary(), "tokenization": self.tokenize_report})

    def humaneval(self, run_dir: RunDir, round_: int) -> dict[str, Any]:
        """HumanEval pass@k of the adapter in the slot (`eval.humaneval`); samples in humaneval.jsonl."""
        from fedtune.eval.humaneval_run import run_humaneval

        start = time.perf_counter()
        metrics = run_humaneval(self.evaluator, self.recipe.eval.humaneval, seed=self.recipe.seed,
                                samples_path=Path(run_dir.path) / "humaneval.jsonl",
                                console=self.console)
        metrics["humaneval_seconds"] = round(time.perf_counter() - start, 3)
        run_dir.log(round_, None, "eval", {"scope": "humaneval", **metrics})
        shown = "  ".join(f"{k.removeprefix('humaneval_')} {v:.3f}" for k, v in metrics.items()
                          if k.startswith("humaneval_pass@"))
        self.console.print(f"HumanEval ({metrics['humaneval_tasks']} problems, "
                           f"{metrics['humaneval_samples']} samples): {shown}")
        return metrics

    def finish(self, run_dir: RunDir, server: Server, result: ServerResult, *,
               emulator_counted: bool = False) -> dict[str, Any]:
        """Save the final adapter (standard PEFT directory) and summary.json; print the table.

        `emulator_counted`: the transport already counted the offsite emulator's downloads (gRPC);
        in simulation each client is charged one download of the emulator package here."""
        self.save_adapter(result.global_state, run_dir.final_dir)
        if self.offsite is not None:
            for client in [] if emulator_counted else self.data.clients:  # one download each, round 0
                server.transport.traffic.record(direction="down", client=client, round=0,
                                                nbytes=self.offsite.package_bytes(client))
        summary = make_summary(
            self.recipe, result, traffic=server.transport.traffic, wall_seconds=server.wall_seconds(),
            adapter_parameters=self.slot.num_parameters(),
            adapter_bytes=self.slot.num_bytes(), run_dir=Path(run_dir.path),
        )
        if self.offsite is not None:
            summary["offsite"] = {**self.offsite.info(), "emulator_final": {
                k.removeprefix("emulator_"): v for k, v in (result.final or {}).items() if k.startswith("emulator_")}}
        if self.recipe.eval.humaneval is not None:
            summary["humaneval"] = self.humaneval(run_dir, result.rounds)
        summary.update(self._selection_summary(run_dir, result))
        run_dir.write_json("summary.json", summary)
        self.console.print(closing_table(summary))
        shown = self.recipe.eval.show_predictions
        if shown and self.last_predictions is not None:
            self.console.print(predictions_table(read_predictions(self.last_predictions, shown),
                                                 title=f"first {shown} answers in predictions/"
                                                       f"{self.last_predictions.name}"))
        self.console.print(f"run directory: {run_dir.path}")
        return summary

    def save_adapter(self, state, directory: Path) -> None:
        """The global adapter `state` as a standard PEFT directory with the tokenizer (BitFit: its
        biases; offsite: the full model with the adapter layers plugged in); the slot holds `state`
        afterwards."""
        self.view.load(state)
        if self.offsite is not None:
            self.offsite.save(state, directory)
        else:
            save_adapter(self.model, self.recipe.adapter, directory)
        self.tokenizer.save_pretrained(directory)

    def _selection_summary(self, run_dir: RunDir, result: ServerResult) -> dict[str, Any]:
        """best/ (output.keep_best), the early-stopping figures, what the metrics measured and where
        the predictions are, for summary.json."""
        out: dict[str, Any] = {"eval_metrics": {m: RULES[m] for m in self.recipe.eval.metrics}}
        selection = result.selection
        if selection is not None:
            out.update(selection.summary())
            if selection.best_state:
                best = Path(run_dir.path) / "best"
                self.save_adapter(selection.best_state, best)
                self.view.load(result.global_state)
                out["best"]["adapter"] = str(best)
            stopped = selection.stopped_at
            out["stopped_early"] = stopped is not None and stopped < self.recipe.federation.rounds
        if self.predictions_dir is not None and self.predictions_dir.is_dir():
            out["predictions"] = str(self.predictions_dir)
        return out
