"""Ctrl-C and SIGTERM stop `fedtune run` checkpoint-safe and print the real directory to resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from fedtune.cli import main
from fedtune.track.rundir import RunDir


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_after_round_1_stops_the_run_resumably(signum, code, tiny_recipe, tmp_path,
                                                        monkeypatch, capsys, request):
    recipe = tiny_recipe(federation__rounds=2, federation__clients=2, eval__every=0,
                         eval__at_start=False, eval__exact_match=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    save = RunDir.save_checkpoint

    def save_then_signal(self, ckpt, keep):
        saved = save(self, ckpt, keep)
        if ckpt.round == 1:
            os.kill(os.getpid(), signum)  # delivered to this (main) thread right here
        return saved

    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_signal)
    # A shell without job control starts background jobs with SIGINT ignored (POSIX), and Python
    # then keeps it ignored: give this test the interactive default, Ctrl-C raising KeyboardInterrupt.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous_int))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", str(path), "output.name=stopped"]) == code
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone again
    run_dir = Path(recipe["output"]["dir"]) / "stopped"
    err = " ".join(capsys.readouterr().err.split())
    assert f"interrupted; continue with `fedtune run --resume {run_dir}`" in err
    assert "RUN_DIR" not in err
    assert (run_dir / "checkpoints" / "round_000001" / "state.json").is_file()
    assert not (run_dir / "summary.json").exists()
    if signum == signal.SIGTERM:  # the printed command continues the run to its end
        monkeypatch.setattr(RunDir, "save_checkpoint", save)
        assert main(["run", "--resume", str(run_dir)]) == 0
        assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
