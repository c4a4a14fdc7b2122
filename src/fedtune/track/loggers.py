"""TensorBoard and MLflow logging of a run (`output.loggers`), fed from the run directory's log.

Every event the run directory logs (round summaries with bytes, client fits, evaluations) goes
to the configured trackers as scalars at step = round: `round/<key>`, `fit/<client>/<key>`,
`eval/global/<key>`, `eval/<client>/<key>`; the summary adds `final/<key>` and the totals. The
recipe is logged as parameters (MLflow, dotted keys) and as text (TensorBoard).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from fedtune.errors import RunDirError

log = logging.getLogger("fedtune.track")

LOGGERS = ("tensorboard", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}   # module to import for each
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
_MAX_PARAM = 500   # MLflow parameter values are limited in length


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def close(self, status: str) -> None: ...


def event_scalars(event: dict[str, Any]) -> dict[str, float]:
    """The numeric values of one metrics.jsonl event under tracker keys (strings, bools dropped)."""
    kind, client, values = event["kind"], event.get("client"), event.get("values") or {}
    if kind == "round":
        prefix = "round"
    elif kind == "eval":
        scope = values.get("scope")
        prefix = f"eval/{client}" if scope == "client" and client else f"eval/{scope or 'global'}"
    elif client:
        prefix = f"{kind}/{client}"
    else:
        prefix = kind
    return {f"{prefix}/{key}": value for key, value in _numbers(values).items()}


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The closing figures: `final/<metric>` and the run's totals (bytes, seconds, parameters)."""
    out = {f"final/{k}": v for k, v in _numbers(summary.get("final") or {}).items()}
    totals = {k: summary.get(k) for k in ("bytes_up", "bytes_down", "wall_seconds",
                                          "adapter_parameters", "rejected_replies", "missing_updates")}
    out.update({f"total/{k}": v for k, v in _numbers(totals).items()})
    return out


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {_BAD_KEY.sub("_", str(k)): float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(recipe: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested recipe as dotted keys -> text values (lists and nulls as YAML-like text)."""
    out: dict[str, str] = {}
    for key, value in recipe.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            out[_BAD_KEY.sub("_", name)] = text[:_MAX_PARAM]
    return out


class TensorBoardTracker:
    """Scalars into RUN_DIR/tensorboard (one event file per process; resumes append)."""

    def __init__(self, run_dir: Path, recipe_text: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", "```\n" + recipe_text + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per run directory (its id in RUN_DIR/mlflow.json, so a resume continues it)."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any], tracking_uri: str | None,
                 experiment: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracking_uri
        if uri is None:
            # The default: a local file store beside the run directories (`mlflow ui
            # --backend-store-uri runs/mlruns`). MLflow 3 keeps that store in maintenance mode
            # and asks for this opt-in; a tracking_uri (a server, sqlite:///...) needs none.
            uri = (run_dir.parent / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        where = f"output.mlflow.tracking_uri {uri!r}"
        marker = run_dir / "mlflow.json"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if marker.is_file():
                self.run_id = json.loads(marker.read_text())["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            params = [Param(k, v) for k, v in flat_params(recipe).items()]
            for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.set_tag(self.run_id, "fedtune.run_dir", str(run_dir.resolve()))
        except Exception as exc:  # mlflow raises its own and requests' types for a bad store
            raise RunDirError(f"{where}: cannot log to MLflow ({exc})") from None
        marker.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The trackers of one run directory; a tracker that fails mid-run is warned about and dropped
    (training goes on; metrics.jsonl keeps everything)."""

    def __init__(self, trackers: dict[str, Tracker]):
        self.trackers = trackers
        self.last_step = 0

    @classmethod
    def open(cls, run_dir: Path, recipe_text: str, recipe: dict[str, Any]) -> Trackers | None:
        output = recipe.get("output") or {}
        names = output.get("loggers") or []
        if not names:
            return None
        mlflow = output.get("mlflow") or {}
        trackers: dict[str, Tracker] = {}
        for name in names:
            if name == "tensorboard":
                trackers[name] = TensorBoardTracker(run_dir, recipe_text)
            elif name == "mlflow":
                trackers[name] = MlflowTracker(run_dir, recipe, mlflow.get("tracking_uri"),
                                               mlflow.get("experiment") or "fedtune")
        return cls(trackers)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        self.last_step = max(self.last_step, step)
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.scalars(step, values)
            except Exception as exc:  # a tracking backend must never stop training
                log.warning("output.loggers: %s failed (%s); it is off for the rest of the run",
                            name, exc)
                self.trackers.pop(name)

    def close(self, status: str = "FINISHED") -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.close(status)
            except Exception as exc:
                log.warning("output.loggers: closing %s failed (%s)", name, exc)
        self.trackers.clear()
