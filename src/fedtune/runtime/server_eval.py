"""The server's evaluation of the global model on the global test set: its figures, the answers
kept under predictions/, multiple choice, a backdoor's success and, at the end, HumanEval."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.algorithms.attacks import backdoor_metrics
from fedtune.algorithms.party import GlobalEvaluation
from fedtune.data.prompts import TokenizedExample
from fedtune.eval.predictions import predictions_path, write_predictions
from fedtune.track.rundir import RunDir

if TYPE_CHECKING:  # setup.py builds these two with itself
    from fedtune.runtime.setup import Setup


class ServerEvaluation:
    """Global evaluation on a Setup's model (the server's job)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self._test: list[TokenizedExample] | None = None
        self.predictions_dir: Path | None = None   # the run directory's predictions/ (server side)
        self.last_predictions: Path | None = None  # the latest global predictions file
        self._mc_items: list | None = None

    def _global_test(self) -> list[TokenizedExample]:
        """The global test set as evaluated: its first eval.max_examples examples only are
        tokenized (the set grows with the clients, the evaluation does not)."""
        if self._test is None:
            cap = self.setup.recipe.eval.max_examples
            test = self.setup.data.test
            self._test = self.setup.tokenize("global test", test[:cap] if cap else test)
        return self._test

    def write_split(self, run_dir: RunDir) -> None:
        """split.json in the run directory, which also becomes where predictions are written."""
        setup = self.setup
        self.predictions_dir = Path(run_dir.path) / "predictions"
        self._global_test()
        run_dir.write_json("split.json", {**setup.data.summary(), "tokenization": setup.tokenize_report})

    def evaluate_global(self, state, generate: bool, round_: int | None = None) -> dict[str, Any]:
        """Evaluate a global adapter on the global test set; the answers go to
        predictions/round_NNNN_global.jsonl, multiple choice (`mc_accuracy`) on `eval.mc`."""
        setup, recipe = self.setup, self.setup.recipe
        test = self._global_test()
        setup.view.load(state)
        cap = recipe.eval.max_examples
        tokenized = test[:cap] if cap else test
        raw = setup.data.test[:cap] if cap else setup.data.test
        records: list[dict[str, Any]] = []
        metrics = setup.evaluator.evaluate(tokenized, raw, with_generation=generate, predictions=records)
        metrics, records = setup.party.evaluate_global(GlobalEvaluation(
            state, tokenized, raw, generate, metrics, records,
            write=lambda scope, rows: self._write_predictions(round_, scope, rows)))
        path = self._write_predictions(round_, "global", records)
        self.last_predictions = path or self.last_predictions
        if "mc_accuracy" in recipe.eval.metrics:
            metrics.update(self.mc_accuracy())
        attack = recipe.federation.attack
        if generate and attack.kind == "backdoor" and attack.clients:
            metrics.update(backdoor_metrics(setup.evaluator.generate, raw, trigger=attack.trigger,
                                            target=attack.target))
        return metrics

    def _write_predictions(self, round_: int | None, scope: str, records: list[dict[str, Any]]) -> Path | None:
        if not records or self.predictions_dir is None or round_ is None:
            return None
        return write_predictions(predictions_path(self.predictions_dir, round_, scope), records)

    def mc_accuracy(self) -> dict[str, Any]:
        """Multiple choice on `eval.mc` with the adapter in the slot (of Party.eval_model)."""
        from fedtune.eval.multiple_choice import load_mc_items, mc_accuracy

        setup = self.setup
        if self._mc_items is None:
            self._mc_items = load_mc_items(setup.recipe.eval.mc)
        model = setup.party.eval_model(setup.model)
        with torch.no_grad():
            found = mc_accuracy(model, setup.tokenizer, self._mc_items, setup.device)
        return {"mc_accuracy": found["mc_accuracy"]} if found.get("n_items") else {}

    def humaneval(self, run_dir: RunDir, round_: int) -> dict[str, Any]:
        """HumanEval pass@k of the adapter in the slot (`eval.humaneval`); samples in humaneval.jsonl."""
        from fedtune.eval.humaneval_run import run_humaneval

        setup = self.setup
        start = time.perf_counter()
        metrics = run_humaneval(setup.evaluator, setup.recipe.eval.humaneval, seed=setup.recipe.seed,
                                samples_path=Path(run_dir.path) / "humaneval.jsonl",
                                console=setup.console)
        metrics["humaneval_seconds"] = round(time.perf_counter() - start, 3)
        run_dir.log(round_, None, "eval", {"scope": "humaneval", **metrics})
        shown = "  ".join(f"{k.removeprefix('humaneval_')} {v:.3f}" for k, v in metrics.items()
                          if k.startswith("humaneval_pass@"))
        setup.console.print(f"HumanEval ({metrics['humaneval_tasks']} problems, "
                            f"{metrics['humaneval_samples']} samples): {shown}")
        return metrics
