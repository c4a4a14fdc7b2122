"""The 2-rank harness of the multi-process tests (torchrun on CPU, gloo): the launch command, its
environment, a launch that must succeed, and tensor comparisons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import fedtune

WAIT = 240  # seconds: the most any process of these tests may take


def env() -> dict[str, str]:
    """This checkout's sources first on the path; one thread per rank."""
    src = str(Path(fedtune.__file__).resolve().parents[1])
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node 2` (a free rendezvous port on localhost)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *args]


def launch(cwd: Path, *args: str) -> str:
    """Run a 2-rank launch to completion; its output (it must succeed)."""
    proc = subprocess.run(torchrun(*args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=WAIT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(run_dir: Path) -> list[str]:
    """Every file of a run directory, relative to it."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def assert_same_run(runs: Path, name: str, single: dict, *, bytes_up_within: int = 0) -> Path:
    """The run directory `runs/name` of a 2-rank launch against `runs/single` of the same recipe
    in one process (`single`: its summary): the same files, a trained final adapter within 1e-5,
    the same evaluation figures, bytes and adapter size (bytes up within `bytes_up_within`: the
    text of float metrics may differ by a digit). Returns the 2-rank run's directory."""
    import json

    import pytest
    from safetensors.torch import load_file

    assert sorted(p.name for p in runs.iterdir()) == sorted([name, "single"])
    one, two = runs / "single", runs / name
    assert files(two) == files(one)
    final = load_file(str(two / "final" / "adapter_model.safetensors"))
    expected = load_file(str(one / "final" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 1e-3  # trained
    assert_close(final, expected, atol=1e-5)
    summary = json.loads((two / "summary.json").read_text())
    for key in ("initial", "final"):  # the server's evaluation, run by both ranks in step
        assert summary[key] == pytest.approx(single[key], rel=1e-4), key
    assert summary["bytes_down"] == single["bytes_down"]
    assert summary["bytes_up"] == pytest.approx(single["bytes_up"], abs=bytes_up_within)
    assert summary["adapter_parameters"] == single["adapter_parameters"]  # whole, not one share
    return two
