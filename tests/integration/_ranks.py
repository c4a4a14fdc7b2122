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
