"""Attacks on a live deployment, on loopback: does the run finish as it would have without them?

Each scenario starts `fedtune server` and its clients as processes (the built-in tiny model, TLS
and tokens, a few rounds), runs one attack against it from this process or from a hostile
participant process, and compares the run with a reference run without the attack:

- flood: 4 connections firing wrong-token calls (64 in flight each) for the whole run;
- oversize: parties with valid tokens upload 300 MB (three identities, repeatedly);
- many_tensors: a party uploads one message of 1,000,000 tiny tensors (about 71 MB), repeatedly;
- meta_train_loss / meta_n_examples / meta_eval_loss: client_2 is a hostile participant whose
  update carries a string train_loss, n_examples = 10**400, or whose evaluation a string loss;
- weight_claim: client_2's update claims n_examples = 10**15 (its tensors are zeros).

The strangers' and uploaders' scenarios compare with an honest run; the participant scenarios
with a run where client_2 answers every request with an ERROR (its update is simply missing).
Printed per attack: whether the run completed, whether its final adapter equals the reference
(max abs difference), honest updates and evaluation replies lost, the mean round time as a ratio
of the reference's, and the server's peak RSS above its quiet baseline (sampled with psutil every
10 ms from the moment all clients joined), next to the target of 64 MiB + 1.5 x the update size.

    python benchmarks/hostile.py                    # every attack: about 10 runs of ~1 minute
    python benchmarks/hostile.py --attacks flood oversize --rounds 3

Everything listens on 127.0.0.1 and every loop is bounded by the run's end or a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from safetensors.torch import load_file

from fedtune.config import load_recipe
from fedtune.transport.certs import make_certs
from fedtune.transport.codec import PREFIX_BYTES, decode, encode
from fedtune.transport.framing import FRAME, FRAME_MAGIC, LAST, iter_frames
from fedtune.transport.grpc_client import ServerConnection
from fedtune.transport.grpc_server import FETCH
from fedtune.wire import Message, MessageKind

MB = 1024**2
CLIENTS = ["client_0", "client_1", "client_2"]
PARTICIPANT_ATTACKS = ("meta_train_loss", "meta_n_examples", "meta_eval_loss", "weight_claim")
ATTACKS = ("flood", "oversize", "many_tensors", *PARTICIPANT_ATTACKS)
RUN_TIMEOUT = 600.0


# ------------------------------------------------------------------ the run under test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(root: Path, port: int, rounds: int) -> Path:
    certs = root / "certs"
    if not certs.exists():
        make_certs(certs, CLIENTS)
    recipe = {
        "name": "hostile", "seed": 5,
        "model": {"name": "builtin:tiny"},
        "data": {"source": "synthetic", "synthetic": {"examples_per_category": 12},
                 "template": "compact", "max_length": 96, "test_fraction": 0.2,
                 "val_fraction": 0.0, "split": {"method": "iid"}},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "federation": {"clients": len(CLIENTS), "rounds": rounds},
        "train": {"local_steps": 4, "batch_size": 4, "lr": 0.01},
        "eval": {"every": 1, "max_new_tokens": 2, "batch_size": 32},
        "output": {"dir": str(root / "runs"), "progress": False},
        "transport": {
            "kind": "grpc", "address": f"127.0.0.1:{port}",
            "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem", "key": f"{certs}/server.key"},
            "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token",
            "round_timeout": 120, "join_timeout": 240,
            "retry": {"initial_delay": 0.2, "max_delay": 1.0, "attempts": 400, "give_up_after": 300},
        },
    }
    path = root / f"recipe-{port}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class Run:
    """One deployment: a server and three clients (client_2 maybe a hostile participant)."""

    def __init__(self, root: Path, name: str, rounds: int, participant: str | None):
        self.root, self.name = root, name
        self.port = _free_port()
        self.recipe = _recipe(root, self.port, rounds)
        self.section = load_recipe(str(self.recipe)).transport
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.logs = root / name
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self._start("server", [sys.executable, "-m", "fedtune", "server", str(self.recipe),
                               f"output.name={name}"], env)
        for client in CLIENTS:
            if client == "client_2" and participant is not None:
                cmd = [sys.executable, __file__, "--participant", participant, "--recipe",
                       str(self.recipe), "--name", client]
            else:
                cmd = [sys.executable, "-m", "fedtune", "client", str(self.recipe), "--name", client]
            self._start(client, cmd, env)
        self.server = psutil.Process(self.procs["server"].pid)
        self.baseline = 0
        self.peak = 0
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _start(self, label: str, cmd: list[str], env: dict[str, str]) -> None:
        out = (self.logs / f"{label}.log").open("w")
        self.procs[label] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def token(self, client: str) -> str:
        return Path(self.section.token_file.replace("{name}", client)).read_text().strip()

    def wait_joined(self) -> None:
        """Until the server says every client joined; then the quiet baseline RSS is taken."""
        deadline = time.monotonic() + RUN_TIMEOUT
        log = self.logs / "server.log"
        while "clients joined" not in log.read_text():
            if self.procs["server"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the server did not gather its clients; see {log}")
            time.sleep(0.1)
        self.baseline = self.peak = self.server.memory_info().rss
        self._sampler.start()

    def _sample(self) -> None:
        while not self._sampling.wait(0.01):
            try:
                self.peak = max(self.peak, self.server.memory_info().rss)
            except psutil.Error:
                return

    def running(self) -> bool:
        return self.procs["server"].poll() is None

    def finish(self) -> dict[str, Any]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs["server"].wait(timeout=RUN_TIMEOUT)
        self._sampling.set()
        deadline = time.monotonic() + 30  # clients end within seconds of FINISH; if the server
        for proc in self.procs.values():  # died they would retry for minutes: stop them
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        run_dir = Path(load_recipe(str(self.recipe)).output.dir) / self.name
        events = []
        if (run_dir / "metrics.jsonl").exists():
            events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        checkpoints = sorted((run_dir / "checkpoints").glob("round_*")) if run_dir.exists() else []
        return {
            "completed": (run_dir / "summary.json").exists() and self.procs["server"].returncode == 0,
            "adapter": load_file(str(checkpoints[-1] / "global.safetensors")) if checkpoints else None,
            "events": events,
            "extra_rss": self.peak - self.baseline,
            "exit": self.procs["server"].returncode,
        }


# ------------------------------------------------------------------ attacks (from this process)


def flood(run: Run, stop: threading.Event, stats: dict[str, float]) -> None:
    """4 connections, wrong tokens, 64 calls in flight each, until the run ends."""
    counts = [0] * 4

    def one(index: int) -> None:
        conn = ServerConnection(run.section, "client_0", address=run.address, token="w" * 43)
        call = conn.channel.unary_unary(FETCH, request_serializer=None, response_deserializer=None)
        try:
            while not stop.is_set():
                futures = [call.future(b"{}", metadata=conn.metadata, timeout=10) for _ in range(64)]
                for future in futures:
                    future.exception()
                counts[index] += len(futures)
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["calls"] = sum(counts)
    stats["calls_per_s"] = sum(counts) / max(time.monotonic() - start, 1e-9)


def _upload(run: Run, client: str, frames, stats: dict[str, float]) -> None:
    conn = ServerConnection(run.section, client, address=run.address, token=run.token(client))
    sent = [0]

    def counted():
        for frame in frames:
            sent[0] += len(frame)
            yield frame

    try:
        conn._push(counted(), metadata=conn.metadata, timeout=60)
        stats["accepted"] = stats.get("accepted", 0) + 1
    except Exception as exc:  # noqa: BLE001 - any refusal is what we count
        code = getattr(exc, "code", lambda: None)()
        key = f"refused_{code.name if code is not None else type(exc).__name__}"
        stats[key] = stats.get(key, 0) + 1
    finally:
        stats["max_sent_mb"] = max(stats.get("max_sent_mb", 0.0), sent[0] / MB)
        conn.close()


def oversize(run: Run, stop: threading.Event, stats: dict[str, float]) -> None:
    """Three parties at once, each declaring and streaming 300 MB (real bytes, chunk by chunk)."""
    size, chunk = 300 * MB, run.section.chunk_bytes
    payload = b"\x00" * chunk

    def frames(message_id: int):
        count = -(-size // chunk)
        for index in range(count):
            last = index == count - 1
            body = payload[: size - index * chunk] if last else payload
            yield FRAME.pack(FRAME_MAGIC, message_id, index, LAST if last else 0, size) + body

    while not stop.is_set():
        threads = [threading.Thread(target=_upload, args=(run, c, frames(i + 1), stats))
                   for i, c in enumerate(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.wait(0.5)


def many_tensor_message(n: int) -> bytes:
    """An UPDATE of `n` one-float tensors, built directly in the wire format (fast for 10**6)."""
    head = encode(Message(MessageKind.UPDATE, 1, "client_2", "server", meta={"n_examples": 1}))
    head = head[: PREFIX_BYTES + struct.unpack_from("<Q", head, 4)[0]]
    index = "{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
                           for i in range(n)) + "}"
    raw = index.encode()
    raw += b" " * (-len(raw) % 8)
    return head + struct.pack("<Q", len(raw)) + raw + bytes(4 * n)


def many_tensors(run: Run, stop: threading.Event, stats: dict[str, float]) -> None:
    data = many_tensor_message(1_000_000)
    stats["message_mb"] = len(data) / MB
    while not stop.is_set():
        _upload(run, "client_2", iter_frames([data], 1, run.section.chunk_bytes), stats)
        stop.wait(1.0)


# ------------------------------------------------------------------ a hostile participant (process)


def participant(mode: str, recipe: str, name: str) -> None:
    """client_2 as a hostile party: answers with the right tensors and hostile values, or (mode
    'refuse', the reference) with an ERROR to everything."""
    section = load_recipe(recipe).transport
    token = Path(section.token_file.replace("{name}", name)).read_text().strip()
    conn = ServerConnection(section, name, address=section.address, token=token)
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            for data in conn.messages():
                msg = decode(data)
                if msg.kind == MessageKind.FINISH:
                    print(name, "finished", flush=True)
                    conn.close()
                    os._exit(0)  # do not wait for gRPC's threads at interpreter exit
                reply = _hostile_reply(mode, msg, name)
                try:
                    print(name, msg.kind.value, msg.round, conn.push(encode(reply), timeout=60), flush=True)
                except Exception as exc:  # noqa: BLE001 - a refusal is an outcome, not a failure
                    print(name, msg.kind.value, msg.round, "refused:", exc, flush=True)
        except Exception as exc:  # noqa: BLE001 - the server restarting or gone: retry, bounded
            print(name, "stream:", exc, flush=True)
            time.sleep(0.5)


def _hostile_reply(mode: str, msg: Message, name: str) -> Message:
    def error() -> Message:
        return Message(MessageKind.ERROR, msg.round, name, "server", meta={"error": "refusing"})

    if msg.kind == MessageKind.FIT and mode in ("meta_train_loss", "meta_n_examples", "weight_claim"):
        meta = {"meta_train_loss": {"n_examples": 10, "metrics": {"train_loss": "high"}},
                "meta_n_examples": {"n_examples": 10**400, "metrics": {"train_loss": 1.0}},
                "weight_claim": {"n_examples": 10**15, "metrics": {"train_loss": 1.0}}}[mode]
        tensors = {k: torch.zeros_like(v) for k, v in msg.tensors.items()}
        return Message(MessageKind.UPDATE, msg.round, name, "server", tensors=tensors, meta=meta)
    if msg.kind == MessageKind.EVALUATE and mode == "meta_eval_loss":
        return Message(MessageKind.EVAL_RESULT, msg.round, name, "server",
                       meta={"n_examples": 1, "metrics": {"loss": "high"}})
    return error()


# ------------------------------------------------------------------ the table


def _scenario(root: Path, name: str, rounds: int, attack: str | None) -> dict[str, Any]:
    participant_mode = attack if attack in PARTICIPANT_ATTACKS else None
    if name == "reference_refuse":
        participant_mode = "refuse"
    run = Run(root, name, rounds, participant_mode)
    stats: dict[str, float] = {}
    stop = threading.Event()
    attacker = None
    try:
        run.wait_joined()
        if attack in ("flood", "oversize", "many_tensors"):
            target = {"flood": flood, "oversize": oversize, "many_tensors": many_tensors}[attack]
            attacker = threading.Thread(target=target, args=(run, stop, stats), daemon=True)
            attacker.start()
        while run.running():
            time.sleep(0.2)
    finally:
        stop.set()
        result = run.finish()
        if attacker is not None:
            attacker.join(60)
    result["stats"] = stats
    return result


def _round_seconds(events: list[dict[str, Any]]) -> float:
    seconds = [e["values"]["seconds"] for e in events if e["kind"] == "round" and e["client"] is None]
    return sum(seconds) / len(seconds) if seconds else float("nan")


def _lost(events: list[dict[str, Any]], honest: list[str]) -> tuple[int, int]:
    updates = sum(1 for e in events if e["kind"] == "no_update" and e["client"] in honest)
    evals = {(e["round"], e["client"]) for e in events
             if e["kind"] == "eval" and e["client"] in honest}
    return updates, len(evals)


def _difference(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> float:
    if a is None or b is None or a.keys() != b.keys():
        return float("nan")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--participant", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.participant:
        participant(args.participant, args.recipe, args.name)
        return
    with tempfile.TemporaryDirectory(prefix="fedtune-hostile-") as tmp:
        root = Path(tmp)
        print(f"reference run (3 honest clients, {args.rounds} rounds) ...", flush=True)
        references = {"honest": _scenario(root, "reference_honest", args.rounds, None)}
        if set(args.attacks) & set(PARTICIPANT_ATTACKS):
            print("reference run (client_2 answers every request with an ERROR) ...", flush=True)
            references["refuse"] = _scenario(root, "reference_refuse", args.rounds, None)
        adapter = references["honest"]["adapter"]
        update_mb = sum(t.numel() * t.element_size() for t in adapter.values()) / MB if adapter else 0.0
        rows = []
        for attack in args.attacks:
            print(f"attack: {attack} ...", flush=True)
            result = _scenario(root, f"attack_{attack}", args.rounds, attack)
            reference = references["refuse" if attack in PARTICIPANT_ATTACKS else "honest"]
            honest = CLIENTS[:2] if attack in PARTICIPANT_ATTACKS else CLIENTS
            lost_updates, evals = _lost(result["events"], honest)
            _, reference_evals = _lost(reference["events"], honest)
            rows.append({
                "attack": attack, "completed": result["completed"], "exit": result["exit"],
                "same_adapter": _difference(result["adapter"], reference["adapter"]) == 0.0,
                "max_abs_diff": _difference(result["adapter"], reference["adapter"]),
                "honest_updates_lost": lost_updates,
                "eval_replies_lost": max(0, reference_evals - evals),
                "round_time_ratio": _round_seconds(result["events"]) / _round_seconds(reference["events"]),
                "peak_rss_mb": result["extra_rss"] / MB,
                "stats": result["stats"],
            })
        target = 64 + 1.5 * update_mb
        print(f"\nupdate size {update_mb:.3f} MiB; RSS target: peak within {target:.1f} MiB of the "
              f"quiet baseline; honest reference peaks {references['honest']['extra_rss'] / MB:.1f} MiB")
        header = (f"{'attack':<16} {'completed':>9} {'same adapter':>12} {'max |diff|':>10} "
                  f"{'updates lost':>12} {'evals lost':>10} {'round x':>7} {'peak RSS MiB':>12}  notes")
        print(header)
        print("-" * len(header))
        for r in rows:
            notes = ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r["stats"].items())
            print(f"{r['attack']:<16} {'yes' if r['completed'] else 'NO (' + str(r['exit']) + ')':>9} "
                  f"{'yes' if r['same_adapter'] else 'no':>12} {r['max_abs_diff']:>10.2e} "
                  f"{r['honest_updates_lost']:>12} {r['eval_replies_lost']:>10} "
                  f"{r['round_time_ratio']:>7.2f} {r['peak_rss_mb']:>12.1f}  {notes}")
        print(json.dumps({"update_mb": update_mb, "rss_target_mb": target,
                          "rows": [{k: v for k, v in r.items()} for r in rows]}, default=str))


if __name__ == "__main__":
    main()
