"""Engines and streaming aggregation: in-process clients vs Ray actors, and the server's memory.

`engines`: a Llama of hidden 256 and 4 layers built from a config (fedtune's built-in character
tokenizer), LoRA r=8, 10 local steps of batch 8, 10 clients per round for 3 rounds, with 10 and
with 100 clients; in-process (torch's default threads, and 1 thread as each Ray actor of 1 CPU
has) vs Ray with 1 and 2 actors. Each run is `fedtune.run` in a fresh
process; the figures are its wall time and time inside local training (summary.json), the peak
memory of the whole process tree (the driver, and with a local Ray its raylet, GCS and actors,
sampled every 0.1 s with psutil) and the peak of each actor process.

`server-memory`: full fine-tuning (adapter.method full, the same model), 50 clients per round,
one round of one local step: the peak RSS of the process above its size when the round starts,
with the updates collected (the strategy's fold turned off: what fedtune did before) and streamed.

    python benchmarks/engines.py engines                       # the whole table (minutes)
    python benchmarks/engines.py engines --clients 10 --engines inprocess,ray1
    python benchmarks/engines.py engines --rounds 1 --steps 3      # a shorter workload
    python benchmarks/engines.py server-memory --clients 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# key -> (federation.engine, actors, OMP/torch threads of the run's process: None = torch's default)
ENGINES = {"inprocess": ("inprocess", 0, None), "inprocess1t": ("inprocess", 0, 1),
           "ray1": ("ray", 1, None), "ray2": ("ray", 2, None)}


def make_model(path: Path) -> str:
    """The benchmark's Llama (hidden 256, 4 layers) with the built-in tokenizer, saved once."""
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import fedtune

    tokenizer = AutoTokenizer.from_pretrained(Path(fedtune.__file__).parent / "assets" / "tiny")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def recipe(model: str, out: str, name: str, *, clients: int, per_round: int, rounds: int,
           engine: str, actors: int, method: str = "lora", steps: int = 10) -> dict:
    adapter = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0} if method == "lora" else {"method": method}
    return {
        "name": name, "seed": 0, "model": {"name": model},
        "data": {"source": "synthetic", "synthetic": {"examples_per_category": max(40, 3 * clients)},
                 "template": "compact", "max_length": 96, "test_fraction": 0.1, "val_fraction": 0.0,
                 "split": {"method": "iid"}},
        "adapter": adapter,
        "federation": {"clients": clients, "clients_per_round": per_round, "rounds": rounds,
                       "engine": engine, "ray": {"num_actors": max(actors, 1), "cpus_per_actor": 1}},
        "train": {"local_steps": steps, "batch_size": 8, "lr": 1e-3},
        "eval": {"every": 0, "at_start": False, "clients": False, "max_new_tokens": 2, "batch_size": 32},
        "output": {"dir": out, "name": name, "progress": False, "checkpoint_every": 0},
    }


def tree_peak(proc: subprocess.Popen) -> tuple[int, dict[str, int]]:
    """Peak summed RSS of `proc` and its descendants, and each Ray actor's own peak, until it ends."""
    import psutil

    root = psutil.Process(proc.pid)
    peak, actors = 0, {}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                total += rss
                if "ClientActor" in " ".join(p.cmdline()) or p.name().startswith("ray::ClientActor"):
                    actors[str(p.pid)] = max(actors.get(str(p.pid), 0), rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak = max(peak, total)
        time.sleep(0.1)
    return peak, actors


def run_one(raw: dict, threads: int | None = None) -> dict:
    """`fedtune.run(raw)` in a fresh process, its process tree watched; the summary's figures.
    `threads`: OMP_NUM_THREADS for it (Ray gives each 1-CPU actor 1 thread by itself)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(raw, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, __file__, "_run", f.name], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, actors = tree_peak(proc)
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    os.unlink(f.name)
    if proc.returncode != 0:
        raise SystemExit(f"run {raw['name']} failed (exit {proc.returncode})")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"wall": summary["wall_seconds"], "train": summary["train_seconds"], "peak": peak,
            "actors": sorted(actors.values())}


def engines(args: argparse.Namespace) -> None:
    model = make_model(Path(args.work) / "model")
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for key in args.engines.split(","):
            engine, actors, threads = ENGINES[key]
            raw = recipe(model, str(Path(args.work) / "runs"), f"{key}-{clients}-{time.time_ns()}",
                         clients=clients, per_round=10, rounds=args.rounds, engine=engine, actors=actors,
                         steps=args.steps)
            started = time.perf_counter()
            got = run_one(raw, threads)
            got["process"] = time.perf_counter() - started
            rows.append((clients, key, got))
            print(json.dumps({"clients": clients, "engine": key, **got}), flush=True)
    mib = 2**20
    print("\n| clients | engine | wall s (run) | process s (start-up incl.) | training s | peak MiB, process tree | per actor MiB |")
    print("|---|---|---|---|---|---|---|")
    for clients, key, g in rows:
        per_actor = ", ".join(f"{a / mib:.0f}" for a in g["actors"]) or "-"
        print(f"| {clients} | {key} | {g['wall']:.1f} | {g['process']:.1f} | {g['train']:.1f} | "
              f"{g['peak'] / mib:.0f} | {per_actor} |")


def server_memory(args: argparse.Namespace) -> None:
    model = make_model(Path(args.work) / "model")
    results = {}
    for mode in ("collect", "stream"):
        raw = recipe(model, str(Path(args.work) / "runs"), f"mem-{mode}-{time.time_ns()}",
                     clients=args.clients, per_round=args.clients, rounds=1, engine="inprocess",
                     actors=0, method="full", steps=1)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(raw, f)
        out = subprocess.run([sys.executable, __file__, "_memory", f.name, mode], check=True,
                             capture_output=True, text=True).stdout
        os.unlink(f.name)
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({"mode": mode, **results[mode]}), flush=True)
    mib = 2**20
    size = results["stream"]["model_bytes"]
    print(f"\nfull fine-tuning, {args.clients} clients per round, model {size / mib:.0f} MiB (float32):")
    print("| aggregation | peak RSS above the round's start, MiB | in model copies |")
    print("|---|---|---|")
    for mode, label in (("collect", "collected (before)"), ("stream", "streamed (after)")):
        above = results[mode]["peak_above"]
        print(f"| {label} | {above / mib:.0f} | {above / size:.1f} |")


def _run(path: str) -> None:
    import fedtune

    summary = fedtune.run(json.loads(Path(path).read_text()))
    print(json.dumps(summary))


def _memory(path: str, mode: str) -> None:
    """One run in this process; the peak RSS above the RSS when the round starts (kernel's
    peak, reset by /proc/self/clear_refs where allowed, else ru_maxrss)."""
    import resource

    import psutil

    import fedtune
    from fedtune.runtime.server import Server

    marks: dict[str, int] = {}
    original, init = Server.run_round, Server.__init__

    class NoFold:
        """The strategy without `fold`: the server keeps every update (before streaming)."""

        fold = None

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def collecting(self, *a, **kw):
        init(self, *a, **kw)
        self.strategy = NoFold(self.strategy)

    if mode == "collect":
        Server.__init__ = collecting  # type: ignore[method-assign]

    def measured(self, round_):
        marks["start"] = psutil.Process().memory_info().rss
        marks["model_bytes"] = sum(t.numel() * t.element_size() for t in self.global_state.values())
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
            marks["reset"] = 1
        except OSError:
            marks["reset"] = 0
        original(self, round_)
        marks["peak"] = _vm_hwm() if marks["reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    Server.run_round = measured  # type: ignore[method-assign]
    fedtune.run(json.loads(Path(path).read_text()))
    print(json.dumps({"peak_above": marks["peak"] - marks["start"], "model_bytes": marks["model_bytes"],
                      "peak_reset": bool(marks["reset"])}))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        return _run(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":
        return _memory(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["engines", "server-memory"])
    ap.add_argument("--clients", default=None, help="engines: 10,100 ; server-memory: 50")
    ap.add_argument("--engines", default="inprocess,inprocess1t,ray1,ray2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="local steps per client and round")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "fedtune-engines"))
    args = ap.parse_args()
    if args.what == "engines":
        args.clients = args.clients or "10,100"
        engines(args)
    else:
        args.clients = int(args.clients or 50)
        server_memory(args)


if __name__ == "__main__":
    main()
