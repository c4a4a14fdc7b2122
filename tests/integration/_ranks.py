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


def assert_same_run(runs: Path, name: str, single: dict, *, bytes_up_within: int = 0,
                    atol: float = 1e-5) -> Path:
    """The run directory `runs/name` of a 2-rank launch against `runs/single` of the same recipe
    in one process (`single`: its summary): the same files, a trained final adapter within `atol`,
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
    assert_close(final, expected, atol=atol)
    summary = json.loads((two / "summary.json").read_text())
    for key in ("initial", "final"):  # the server's evaluation, run by both ranks in step
        assert summary[key] == pytest.approx(single[key], rel=1e-4), key
    assert summary["bytes_down"] == single["bytes_down"]
    assert summary["bytes_up"] == pytest.approx(single["bytes_up"], abs=bytes_up_within)
    assert summary["adapter_parameters"] == single["adapter_parameters"]  # whole, not one share
    return two


def grpc_transport(certs: Path) -> dict:
    """A TLS gRPC transport for client_0 and client_1 on a free localhost port (its certificates
    and tokens made under `certs`), with timeouts and retries that outlast a slow launch."""
    from fedtune.transport.certs import make_certs

    make_certs(certs, ["client_0", "client_1"])
    return {
        "kind": "grpc", "address": f"127.0.0.1:{free_port()}",
        "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem", "key": f"{certs}/server.key"},
        "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token",
        "round_timeout": 120, "join_timeout": 120,
        "retry": {"initial_delay": 0.2, "max_delay": 1.0, "attempts": 200, "give_up_after": 120},
    }


def deploy_with_a_two_rank_client(workdir: Path, recipe: dict) -> dict[str, torch.Tensor]:
    """Deploy `recipe` (2 clients, `grpc_transport`): `fedtune server` as run "deployed",
    client_0 on 2 ranks under torchrun and client_1 in one process. Each must end with 0 and
    client_0's rank 0 alone reports its rounds. Returns the deployed run's final adapter."""
    import time

    import yaml
    from safetensors.torch import load_file

    path = workdir / "deploy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    logs: dict[str, Path] = {}

    def start(label: str, command: list[str]) -> subprocess.Popen:
        logs[label] = workdir / f"{label}.log"
        return subprocess.Popen(command, cwd=workdir, env=env(), stdout=logs[label].open("w"),
                                stderr=subprocess.STDOUT)

    fedtune_cmd = [sys.executable, "-m", "fedtune"]
    procs = {
        "server": start("server", [*fedtune_cmd, "server", str(path), "output.name=deployed"]),
        "client_0": start("client_0", torchrun("-m", "fedtune", "client", str(path), "--name", "client_0")),
        "client_1": start("client_1", [*fedtune_cmd, "client", str(path), "--name", "client_1"]),
    }
    try:
        deadline = time.monotonic() + WAIT
        for label, proc in procs.items():
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, logs[label].read_text()[-5000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    rounds = recipe["federation"]["rounds"]
    assert logs["client_0"].read_text().count(f"client_0: finished; {rounds} training rounds") == 1
    return load_file(str(Path(recipe["output"]["dir"]) / "deployed" / "final" / "adapter_model.safetensors"))
