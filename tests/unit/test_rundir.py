"""Run directories: never overwritten, atomic checkpoints, resumable event logs."""

from __future__ import annotations

import pytest
import torch

from fedtune.errors import RunDirError
from fedtune.track.rundir import Checkpoint, RunDir


def test_named_directory_is_not_reused(tmp_path):
    run = RunDir.create(tmp_path, "x", explicit=True)
    (run.path / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(RunDirError, match="--resume"):
        RunDir.create(tmp_path, "x", explicit=True)


def test_generated_names_get_a_suffix(tmp_path):
    a = RunDir.create(tmp_path, "run")
    b = RunDir.create(tmp_path, "run")
    assert a.path != b.path and b.path.name == "run-1"


def test_checkpoints_keep_the_latest_and_load_exactly(tmp_path):
    run = RunDir.create(tmp_path, "r")
    for r in (1, 2, 3):
        g = {"w": torch.full((2, 2), float(r))}
        run.save_checkpoint(Checkpoint(r, g, {"m": torch.tensor([r])}, {"traffic": {}, "x": r}), keep=2)
    names = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert names == ["round_000002", "round_000003"]
    ckpt = run.latest_checkpoint()
    assert ckpt.round == 3 and ckpt.info["x"] == 3
    assert torch.equal(ckpt.global_state["w"], torch.full((2, 2), 3.0))
    assert ckpt.strategy_state["m"].tolist() == [3]


def test_events_after_a_round_are_dropped_on_resume(tmp_path):
    run = RunDir.create(tmp_path, "r")
    for r in (0, 1, 2, 3):
        run.log(r, None, "round", {"r": r})
    run.truncate_events_after(1)
    assert [e["round"] for e in run.events()] == [0, 1]


def test_open_refuses_a_directory_without_recipe(tmp_path):
    with pytest.raises(RunDirError, match="not a fedtune run directory"):
        RunDir.open(tmp_path)


def test_a_broken_checkpoint_is_reported(tmp_path):
    run = RunDir.create(tmp_path, "r")
    run.save_checkpoint(Checkpoint(1, {"w": torch.zeros(1)}, {}, {}), keep=1)
    (run.path / "checkpoints" / "round_000001" / "global.safetensors").write_bytes(b"junk")
    with pytest.raises(RunDirError, match="unreadable"):
        run.latest_checkpoint()
