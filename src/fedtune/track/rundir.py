"""The run directory: recipe as run, metrics log, checkpoints, final adapter and summary.

Layout:
    recipe.yaml         the validated recipe, every default filled in
    split.json          examples and categories per client
    metrics.jsonl       one JSON object per event: {"round", "client", "kind", "values", "time"}
    checkpoints/round_000005/{global,strategy,clients}.safetensors, state.json
    final/              the final global adapter as a standard PEFT directory, with the tokenizer
    summary.json        the closing figures
    tensorboard/, mlflow.json   with `output.loggers` (every logged event also goes there)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtune.errors import RunDirError

State = dict[str, torch.Tensor]


@contextmanager
def naming_on_interrupt(run_dir: RunDir) -> Iterator[None]:
    """A KeyboardInterrupt (Ctrl-C, SIGTERM) raised inside carries `run_dir` as `.run_dir`, so the
    command can say which directory `--resume` continues."""
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.run_dir = run_dir.path  # type: ignore[attr-defined]
        raise


@dataclass
class Checkpoint:
    round: int
    global_state: State
    strategy_state: State
    info: dict[str, Any]
    client_state: State = field(default_factory=dict)  # simulated clients' persistent state


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._trackers: Any = None      # fedtune.track.loggers.Trackers, opened at the first event
        self._trackers_checked = False

    # -- creation and opening -------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, name: str, *, explicit: bool = False,
               resume_with: str = "fedtune run --resume") -> RunDir:
        """A new, empty run directory. An existing one is never reused silently.

        With `explicit` (the user named the directory) an existing non-empty directory is an
        error; otherwise a numeric suffix is added to the generated name.
        """
        root = Path(root)
        path = root / name
        if explicit:
            cls.check_free(path, resume_with=resume_with)
        else:
            n = 1
            while path.exists():
                path = root / f"{name}-{n}"
                n += 1
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create run directory {path}: {exc}") from None
        return cls(path)

    @staticmethod
    def check_free(path: Path, *, resume_with: str = "fedtune run --resume") -> None:
        """Refuse an existing non-empty directory; the message says how to continue that run
        (`resume_with`: the command of the process that refuses, e.g. `fedtune server --resume`)."""
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunDirError(
                f"run directory {path} already exists and is not empty; choose another "
                f"output.name, or continue it with `{resume_with} {path}`"
            )

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / "recipe.yaml").is_file():
            raise RunDirError(f"{path} is not a fedtune run directory (no recipe.yaml)")
        return cls(path)

    # -- files ----------------------------------------------------------------------------------

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_dir(self) -> Path:
        return self.path / "final"

    def write_recipe(self, text: str) -> None:
        self.recipe_path.write_text(text)

    def write_json(self, name: str, obj: Any) -> None:
        _write_json(self.path / name, obj)
        if name == "summary.json" and self._trackers is not None:  # the end of the run
            from fedtune.track.loggers import summary_scalars

            self._trackers.scalars(self._trackers.last_step, summary_scalars(obj))
            self._trackers.close()
            self._trackers, self._trackers_checked = None, False

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def log(self, round_: int, client: str | None, kind: str, values: dict[str, Any]) -> None:
        event = {"round": round_, "client": client, "kind": kind, "values": values,
                 "time": round(time.time(), 3)}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        trackers = self._open_trackers()
        if trackers is not None:
            from fedtune.track.loggers import event_scalars

            trackers.scalars(round_, event_scalars(event))

    def _open_trackers(self) -> Any:
        """The recipe's `output.loggers` (TensorBoard, MLflow), opened once; None when there are none."""
        if self._trackers_checked:
            return self._trackers
        self._trackers_checked = True
        if not self.recipe_path.is_file():
            return None
        text = self.recipe_path.read_text()
        recipe = yaml.safe_load(text) or {}
        if (recipe.get("output") or {}).get("loggers"):
            from fedtune.track.loggers import Trackers

            self._trackers = Trackers.open(self.path, text, recipe)
        return self._trackers

    def events(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_events_after(self, round_: int) -> None:
        """Drop events of rounds after `round_` (logged by a run that stopped before checkpointing)."""
        kept = [e for e in self.events() if e["round"] <= round_]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.metrics_path)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, ckpt: Checkpoint, keep: int) -> Path:
        root = self.path / "checkpoints"
        final = root / f"round_{ckpt.round:06d}"
        tmp = root / f".round_{ckpt.round:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(ckpt.global_state, str(tmp / "global.safetensors"))
        save_file(ckpt.strategy_state, str(tmp / "strategy.safetensors"))
        if ckpt.client_state:
            save_file(ckpt.client_state, str(tmp / "clients.safetensors"))
        _write_json(tmp / "state.json", {"round": ckpt.round, **ckpt.info})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("round_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Checkpoint | None:
        root = self.path / "checkpoints"
        found = sorted(root.glob("round_*")) if root.exists() else []
        if not found:
            return None
        path = found[-1]
        try:
            info = json.loads((path / "state.json").read_text())
            clients = path / "clients.safetensors"
            return Checkpoint(
                round=int(info.pop("round")),
                global_state=load_file(str(path / "global.safetensors")),
                strategy_state=load_file(str(path / "strategy.safetensors")),
                info=info,
                client_state=load_file(str(clients)) if clients.exists() else {},
            )
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise RunDirError(f"checkpoint {path} is unreadable: {exc}") from None
