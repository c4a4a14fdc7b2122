"""The end of a run on the server's side: the final adapter (and best/) saved, summary.json
written with the algorithm's own keys and report rows, the closing table printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.eval.predictions import predictions_table, read_predictions
from fedtune.eval.text_metrics import RULES
from fedtune.models.adapters import save_adapter
from fedtune.runtime.server import Server, ServerResult
from fedtune.runtime.setup import Setup
from fedtune.track.report import closing_table, make_summary
from fedtune.track.rundir import RunDir


def finish_run(setup: Setup, run_dir: RunDir, server: Server, result: ServerResult) -> dict[str, Any]:
    """Save the final adapter (standard PEFT directory) and summary.json; print the table."""
    recipe, evaluation = setup.recipe, setup.evaluation
    save_model(setup, result.global_state, run_dir.final_dir)
    summary = make_summary(
        recipe, result, traffic=server.transport.traffic, wall_seconds=server.wall_seconds(),
        adapter_parameters=setup.slot.num_parameters(),
        adapter_bytes=setup.slot.num_bytes(), run_dir=Path(run_dir.path),
    )
    summary.update(setup.party.summary(result.final))
    report = setup.party.report(summary)
    if report:
        summary["report"] = report
    if recipe.eval.humaneval is not None:
        summary["humaneval"] = evaluation.humaneval(run_dir, result.rounds)
    summary.update(_selection_summary(setup, run_dir, result))
    run_dir.write_json("summary.json", summary)
    setup.console.print(closing_table(summary))
    shown = recipe.eval.show_predictions
    last = evaluation.last_predictions
    if shown and last is not None:
        setup.console.print(predictions_table(read_predictions(last, shown),
                                              title=f"first {shown} answers in predictions/{last.name}"))
    setup.console.print(f"run directory: {run_dir.path}")
    return summary


def save_model(setup: Setup, state, directory: Path) -> None:
    """The global adapter `state` as a standard PEFT directory with the tokenizer (BitFit: its
    biases), or as the algorithm saves it (Party.save); the slot holds `state` afterwards."""
    setup.view.load(state)
    if not setup.party.save(state, directory):
        whole = setup.slot.get() if setup.sharded else None  # FSDP: the slot's whole tensors
        save_adapter(setup.model, setup.recipe.adapter, directory, state=whole)
    setup.tokenizer.save_pretrained(directory)


def _selection_summary(setup: Setup, run_dir: RunDir, result: ServerResult) -> dict[str, Any]:
    """best/ (output.keep_best), the early-stopping figures, what the metrics measured and where
    the predictions are, for summary.json."""
    recipe = setup.recipe
    out: dict[str, Any] = {"eval_metrics": {m: RULES[m] for m in recipe.eval.metrics}}
    selection = result.selection
    if selection is not None:
        out.update(selection.summary())
        if selection.best_state:
            best = Path(run_dir.path) / "best"
            save_model(setup, selection.best_state, best)
            setup.view.load(result.global_state)
            out["best"]["adapter"] = str(best)
        stopped = selection.stopped_at
        out["stopped_early"] = stopped is not None and stopped < recipe.federation.rounds
    predictions = setup.evaluation.predictions_dir
    if predictions is not None and predictions.is_dir():
        out["predictions"] = str(predictions)
    return out
