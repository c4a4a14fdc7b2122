"""Deployment end to end: `fedtune server` and `fedtune client` processes over TLS on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from safetensors.torch import load_file

import fedtune
from fedtune.transport.certs import make_certs
from fedtune.transport.codec import encode
from fedtune.transport.framing import FRAME, FRAME_MAGIC, iter_frames
from fedtune.transport.grpc_client import ServerConnection
from fedtune.wire import Message, MessageKind

CLIENTS = ["client_0", "client_1", "client_2"]
WAIT = 240  # seconds: the most any process of these tests may take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited early"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def _wait_for(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Processes:
    """Starts `python -m fedtune ...` processes; kills whatever is left on exit."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, label: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        out = (self.root / f"{label}.out").open("w")
        err = (self.root / f"{label}.err").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "fedtune", *args], stdout=out, stderr=err, env=env)
        self.procs[label] = proc
        return proc

    def wait(self, label: str, timeout: float = WAIT) -> int:
        return self.procs[label].wait(timeout=timeout)

    def text(self, label: str) -> str:
        return (self.root / f"{label}.out").read_text() + (self.root / f"{label}.err").read_text()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _write_recipe(tiny_recipe, tmp_path: Path, port: int, **overrides) -> tuple[Path, dict]:
    certs = tmp_path / "certs"
    if not certs.exists():
        make_certs(certs, CLIENTS)
    transport = {
        "kind": "grpc", "address": f"127.0.0.1:{port}",
        "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem", "key": f"{certs}/server.key"},
        "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token",
        "round_timeout": 120, "join_timeout": 120,
        "retry": {"initial_delay": 0.2, "max_delay": 1.0, "attempts": 200, "give_up_after": 120},
    }
    recipe = tiny_recipe(transport=transport, **overrides)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, recipe


def _final_checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / "global.safetensors"))


def _simulate(recipe: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    simulated = json.loads(json.dumps(recipe))
    simulated["output"]["name"] = "simulated"
    summary = fedtune.run(simulated)  # the simulation ignores the transport section
    return summary, _final_checkpoint(Path(summary["final_adapter"]).parent)


def _assert_same_adapter(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    # Same machine, same seeds: observed bit-identical. A tolerance covers other BLAS builds.
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def _deploy(tmp_path: Path, path: Path, port: int, *client_args: str) -> Processes:
    """Run `fedtune server` and a `fedtune client` per name to the end; both must exit 0."""
    with Processes(tmp_path) as procs:
        server = procs.start("server", "server", str(path), "output.name=deployed")
        for name in CLIENTS:  # they retry until the server listens
            procs.start(name, "client", str(path), *client_args, "--name", name)
        _wait_for_port(port, server)
        assert procs.wait("server") == 0, procs.text("server")
        for name in CLIENTS:
            assert procs.wait(name) == 0, procs.text(name)
    return procs


def _hostile_calls(port: int, recipe: dict) -> None:
    """What an attacker or a broken peer might send; each must be refused without harm."""
    from fedtune.config import load_recipe

    section = load_recipe(recipe).transport
    address = f"127.0.0.1:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(os.urandom(64 * 1024))
    wrong = ServerConnection(section, "client_1", address=address, token="not-the-token-" * 3)
    try:
        with pytest.raises(grpc.RpcError) as info:
            next(wrong.messages())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        wrong.close()
    token = (Path(section.token_file.replace("{name}", "client_0"))).read_text().strip()
    conn = ServerConnection(section, "client_0", address=address, token=token)
    def oversized():
        return (FRAME.pack(FRAME_MAGIC, 1, i, 0, 64 * 1024**3) + b"x" * 4096 for i in range(10**6))

    def garbage():
        return iter_frames([encode(Message(MessageKind.UPDATE, 1, "client_0", "server"))[:40]], 2, 1024)

    try:
        with pytest.raises(grpc.RpcError) as info:  # this federation offers no download
            conn.fetch("emulator")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        for frames, code in [(oversized, grpc.StatusCode.INVALID_ARGUMENT),  # "too large: ..."
                             (garbage, grpc.StatusCode.INVALID_ARGUMENT)]:
            for _ in range(50):  # ABORTED: the real client_0 was uploading at that moment
                with pytest.raises(grpc.RpcError) as info:
                    conn._push(frames(), metadata=conn.metadata, timeout=30)
                if info.value.code() != grpc.StatusCode.ABORTED:
                    break
                time.sleep(0.1)
            assert info.value.code() == code
    finally:
        conn.close()


def test_server_and_three_clients_over_tls_match_the_simulation(tiny_recipe, tmp_path):
    port = _free_port()
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port)
    with Processes(tmp_path) as procs:
        server = procs.start("server", "server", str(path), "output.name=deployed")
        for name in CLIENTS:  # they retry until the server listens
            procs.start(name, "client", str(path), "--name", name)
        _wait_for_port(port, server)
        _hostile_calls(port, recipe)  # nothing of it may disturb the run
        assert procs.wait("server") == 0, procs.text("server")
        for name in CLIENTS:
            assert procs.wait(name) == 0, procs.text(name)
            assert f"{name}: finished; 2 training rounds" in procs.text(name)

    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and (run_dir / "final" / "adapter_config.json").exists()
    assert summary["transport"]["refused_calls"] == 2  # a wrong token, a Fetch of nothing
    assert summary["transport"]["rejected_messages"] == 2
    assert summary["transport"]["late_replies"] == 0
    log = procs.text("server")
    flat = " ".join(log.split())  # rich wraps long log lines
    assert "refused a call from 127.0.0.1: Pull: wrong or missing token for client 'client_1'" in flat
    assert "too large: message of" in flat and "refused a Fetch from 'client_0'" in flat
    assert len(list((run_dir / "checkpoints").glob("round_*"))) == 2  # every round (kept: 2)
    for name in CLIENTS:  # each client's answers stay in its own directory, never on the server
        assert (Path(recipe["output"]["dir"]) / name / "predictions" / f"round_0002_{name}.jsonl").is_file()
    assert [p.name for p in (run_dir / "predictions").iterdir()] and not list(
        (run_dir / "predictions").glob("*client*"))

    simulated, expected = _simulate(recipe)
    _assert_same_adapter(_final_checkpoint(run_dir), expected)
    assert summary["final"] == simulated["final"]
    assert summary["per_client"] == simulated["per_client"]
    assert summary["bytes_down"] == simulated["bytes_down"]


def test_offsite_clients_download_the_emulator_and_never_load_the_model(tiny_recipe, four_layer_dir,
                                                                      tmp_path):
    port = _free_port()
    path, recipe = _write_recipe(
        tiny_recipe, tmp_path, port, model={"name": four_layer_dir}, adapter={"method": "full"},
        federation__algorithm="offsite", eval__every=0, eval__clients=True,
        federation__options={"drop_ratio": 0.5, "distill": {"steps": 3, "batch_size": 4, "examples": 20}})
    procs = _deploy(tmp_path, path, port, "model.name=/nowhere/full-model")  # not on the clients' machines
    for name in CLIENTS:
        assert f"{name}: received the emulator (3 layers" in procs.text(name)
        assert f"{name}: finished; 2 training rounds" in procs.text(name)

    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    simulated, expected = _simulate(recipe)
    _assert_same_adapter(_final_checkpoint(run_dir), expected)
    assert summary["final"] == simulated["final"]  # plugged-in full model and emulator_* alike
    assert summary["per_client"] == simulated["per_client"]  # evaluated on the clients' emulators
    # Each client downloaded the emulator package once: the same bytes the simulation charges.
    assert summary["bytes_down"] == simulated["bytes_down"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["bytes_down"] > sum(e["values"]["down"] for e in events if e["kind"] == "fit") \
        + 3 * summary["offsite"]["emulator_bytes"] * 0.99
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert final.keys() == load_file(str(Path(four_layer_dir) / "model.safetensors")).keys()


ZEROTH_ORDER = {
    "fedkseed": {"adapter": {"method": "full"}, "federation__options": {"num_seeds": 256, "eps": 1e-3},
                 "train__lr": 2e-4},
    "fedmezo": {"federation__options": {"alpha": 5e-4, "eps": 1e-3}, "train__lr": 1e-3},
}


@pytest.mark.parametrize("algorithm", sorted(ZEROTH_ORDER))
def test_zeroth_order_over_tls_matches_the_simulation(tiny_recipe, tmp_path, algorithm):
    port = _free_port()
    path, recipe = _write_recipe(
        tiny_recipe, tmp_path, port, federation__algorithm=algorithm, train__local_steps=4,
        eval__every=0, eval__clients=True, federation__rounds=3, **ZEROTH_ORDER[algorithm])
    _deploy(tmp_path, path, port)
    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    simulated, expected = _simulate(recipe)
    _assert_same_adapter(_final_checkpoint(run_dir), expected)  # FedKSeed: the K accumulated scalars
    assert summary["final"] == simulated["final"] and summary["per_client"] == simulated["per_client"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fits = [e["values"] for e in events if e["kind"] == "fit"]
    assert len(fits) == 9
    if algorithm == "fedkseed":  # 256 float32 scalars each way, against 34 KB of weights
        assert all(1024 < f["up"] < 2048 and 1024 < f["down"] < 2048 for f in fits)
    else:  # FedMeZO personalises each client's rate from round 2 on, from the losses the server saw
        assert len({f["lr"] for f in fits}) > 1


@pytest.mark.slow
def test_a_client_killed_mid_run_leaves_the_run_completing_with_the_others(tiny_recipe, tmp_path):
    port = _free_port()
    # Enough local steps that a round outlasts the test's reaction time.
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port, federation__rounds=3,
                                 eval__every=0, eval__clients=False, train__local_steps=20)
    raw = yaml.safe_load(path.read_text())
    # The timeout bounds the wait for the dead client; it is long enough that the two live
    # clients always answer in time, however loaded the machine.
    raw["transport"].update(round_timeout=30, min_replies=2)
    path.write_text(yaml.safe_dump(raw))
    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    metrics = run_dir / "metrics.jsonl"

    def rounds_done() -> list[dict]:
        if not metrics.exists():
            return []
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        return [e for e in events if e["kind"] == "round"]

    with Processes(tmp_path) as procs:
        procs.start("server", "server", str(path), "output.name=deployed")
        for name in CLIENTS:
            procs.start(name, "client", str(path), "--name", name)
        # Killed once it has answered round 1: it dies while round 2 waits for it.
        _wait_for(lambda: "round    1 trained" in procs.text("client_2"), "client_2's round 1")
        procs.procs["client_2"].send_signal(signal.SIGKILL)
        assert procs.wait("server") == 0, procs.text("server")
        assert procs.wait("client_0") == 0 and procs.wait("client_1") == 0
    updates = [e["values"]["updates"] for e in rounds_done()]
    # client_2 answered round 1 and is dead by round 3; whether its round-2 reply left before the
    # kill depends on timing, so round 2 may count it or not.
    assert updates[0] == 3 and updates[1] in (2, 3) and updates[2] == 2, updates
    assert (run_dir / "summary.json").exists()
    assert "no reply from client_2" in procs.text("server")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["missing_updates"] == 3 - updates[1] + 1


@pytest.mark.slow
def test_a_killed_server_restarted_with_resume_ends_with_the_same_adapter(tiny_recipe, tmp_path):
    port = _free_port()
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port, federation__rounds=3, eval__every=0,
                                 train__local_steps=20)  # rounds long enough to kill it in one
    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    checkpoints = run_dir / "checkpoints"
    with Processes(tmp_path) as procs:
        procs.start("server", "server", str(path), "output.name=deployed")
        for name in CLIENTS:
            procs.start(name, "client", str(path), "--name", name)
        _wait_for(lambda: checkpoints.exists() and any(checkpoints.glob("round_*")), "a checkpoint")
        procs.procs["server"].send_signal(signal.SIGKILL)
        procs.wait("server")
        assert not (run_dir / "summary.json").exists()
        assert not (checkpoints / "round_000003").exists()
        procs.start("server2", "server", "--resume", str(run_dir))
        assert procs.wait("server2") == 0, procs.text("server2")
        for name in CLIENTS:
            assert procs.wait(name) == 0, procs.text(name)
        assert "reconnected" in procs.text("client_0")
    assert "resuming" in procs.text("server2")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(e["round"] for e in events if e["kind"] == "round") == [1, 2, 3]
    _, expected = _simulate(recipe)
    _assert_same_adapter(_final_checkpoint(run_dir), expected)


@pytest.mark.slow  # tests/integration/test_grpc_secure_aggregation.py is the fast check
def test_secure_aggregation_over_tls_matches_the_simulation(tiny_recipe, tmp_path):
    port = _free_port()
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port, eval__every=0, eval__clients=False,
                                 federation__secure_aggregation={"enabled": True})
    procs = _deploy(tmp_path, path, port)
    for name in CLIENTS:
        text = procs.text(name)
        assert f"{name}: finished; 2 training rounds" in text
        assert "secure aggregation: reveal sent" in text

    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [e["values"] for e in events if e["kind"] == "round"]
    assert [r["secagg"]["survivors"] for r in rounds] == [3, 3]
    assert sum(r["bytes_up"] for r in rounds) == summary["bytes_up"]  # every step counted
    # The unmasked sum is exact in the fixed-point code whatever the masks: the same adapter.
    simulated, expected = _simulate(recipe)
    _assert_same_adapter(_final_checkpoint(run_dir), expected)
    # Only the plain timing figures in the key adverts vary in length.
    assert summary["bytes_up"] == pytest.approx(simulated["bytes_up"], rel=0.01)
    assert summary["bytes_down"] == simulated["bytes_down"]


NEW_ALGORITHMS = {  # issue 21: clients of their own LoRA ranks; FedSP's auxiliary-model download
    "flora": {"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "rank_per_client": [1, 2, 4]}},
    "fedsp": {"adapter": {"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
              "federation__options": {"distill": {"steps": 2, "examples": 20}, "server_steps": 1}},
}


@pytest.mark.parametrize("algorithm", sorted(NEW_ALGORITHMS))
def test_mixed_ranks_and_fedsp_over_tls_match_the_simulation(tiny_recipe, four_layer_dir, tmp_path, algorithm):
    port = _free_port()
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port, model={"name": four_layer_dir},
                                 federation__algorithm=algorithm, eval__every=0, eval__clients=True,
                                 **NEW_ALGORITHMS[algorithm])
    extra = ("model.name=/nowhere/full-model",) if algorithm == "fedsp" else ()
    procs = _deploy(tmp_path, path, port, *extra)   # FedSP: the clients never load the full model
    run_dir = Path(recipe["output"]["dir"]) / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    simulated, expected = _simulate(recipe)
    _assert_same_adapter(_final_checkpoint(run_dir), expected)
    assert summary["final"] == simulated["final"] and summary["per_client"] == simulated["per_client"]
    assert summary["bytes_down"] == simulated["bytes_down"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    up = {e["client"]: e["values"]["up"] for e in events if e["kind"] == "fit" and e["round"] == 1}
    if algorithm == "flora":
        assert up["client_0"] < up["client_1"] < up["client_2"]   # each uploads its own rank
        assert "client_0: LoRA rank 1 " in procs.text("client_0")   # and holds a model of that rank
    else:
        assert "auxiliary model" in procs.text("client_0")
        assert max(up.values()) < summary["fedsp"]["prompt_bytes"] + 4096   # only prompts go up
