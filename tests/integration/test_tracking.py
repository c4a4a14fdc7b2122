"""`output.loggers`: a run's metrics read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtune
from fedtune.config import load_recipe
from fedtune.errors import RecipeError
from fedtune.track.loggers import event_scalars, flat_params, summary_scalars


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_mlflow_hold_what_metrics_jsonl_holds(tiny_recipe, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(output__loggers=["tensorboard", "mlflow"], output__name="tracked",
                         eval__clients=False)
    summary = fedtune.run(recipe)
    run_dir = Path(recipe["output"]["dir"]) / "tracked"
    events = _events(run_dir)
    rounds = [e for e in events if e["kind"] == "round"]
    evals = [e for e in events if e["kind"] == "eval" and e["values"]["scope"] == "global"]
    assert [e["round"] for e in rounds] == [1, 2] and [e["round"] for e in evals] == [0, 1, 2]

    # TensorBoard, read with its own event reader
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"round/train_loss", "round/bytes_up", "round/bytes_down", "eval/global/loss",
            "eval/global/exact_match", "final/loss", "total/bytes_up"} <= tags
    assert [(s.step, s.value) for s in acc.Scalars("round/bytes_up")] == [
        (e["round"], pytest.approx(e["values"]["bytes_up"])) for e in rounds]
    assert [(s.step, s.value) for s in acc.Scalars("eval/global/loss")] == [
        (e["round"], pytest.approx(e["values"]["loss"])) for e in evals]
    fit = next(e for e in events if e["kind"] == "fit" and e["client"] == "client_1")
    [first] = [s for s in acc.Scalars("fit/client_1/train_loss") if s.step == fit["round"]]
    assert first.value == pytest.approx(fit["values"]["train_loss"])
    assert "recipe" in acc.Tags()["tensors"] or "recipe/text_summary" in acc.Tags()["tensors"]

    # MLflow, read with MlflowClient from the default local store (output.dir/mlruns)
    marker = json.loads((run_dir / "mlflow.json").read_text())
    assert marker["tracking_uri"] == (run_dir.parent / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=marker["tracking_uri"])
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["federation.rounds"] == "2"
    assert run.data.params["adapter.method"] == "lora"
    assert run.data.params["model.name"] == recipe["model"]["name"]
    history = client.get_metric_history(marker["run_id"], "round/bytes_down")
    assert sorted((m.step, m.value) for m in history) == [
        (e["round"], pytest.approx(e["values"]["bytes_down"])) for e in rounds]
    assert run.data.metrics["final/loss"] == pytest.approx(summary["final"]["loss"])
    assert run.data.metrics["total/bytes_up"] == summary["bytes_up"]


def test_event_keys_and_params_by_hand():
    fit = {"round": 3, "client": "client_2", "kind": "fit",
           "values": {"train_loss": 1.5, "n_examples": 40, "note": "x", "flag": True}}
    assert event_scalars(fit) == {"fit/client_2/train_loss": 1.5, "fit/client_2/n_examples": 40.0}
    ev = {"round": 1, "client": "client_0", "kind": "eval",
          "values": {"scope": "client", "loss": 2.0, "exact_match": float("nan")}}
    assert event_scalars(ev) == {"eval/client_0/loss": 2.0}   # NaN is not a value to plot
    he = {"round": 5, "client": None, "kind": "eval", "values": {"scope": "humaneval", "pass@1": 0.25}}
    assert event_scalars(he) == {"eval/humaneval/pass_1": 0.25}   # '@' is not allowed in MLflow keys
    assert summary_scalars({"final": {"loss": 1.0}, "bytes_up": 10, "wall_seconds": 2.5}) == {
        "final/loss": 1.0, "total/bytes_up": 10.0, "total/wall_seconds": 2.5}
    assert flat_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": "text"}) == {
        "a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "f": "text"}


def test_unknown_logger_is_refused_at_load():
    with pytest.raises(RecipeError, match="output.loggers"):
        load_recipe(None, ["output.loggers=[wandb]"])
