"""Framework overhead and peak memory of simulations with 10, 100 and 1000 LoRA clients.

Overhead = wall time − time inside local training − time inside evaluation: what fedtune itself
costs (encoding and checking messages, swapping adapters, aggregation, logging, checkpoints).
Each size runs in its own process so that its peak resident memory is its own.

    python benchmarks/overhead.py                    # 10, 100, 1000 clients
    python benchmarks/overhead.py --clients 10 100 --local-steps 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def worker(n_clients: int, args: argparse.Namespace) -> None:
    import fedtune

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"federation.clients={n_clients}", f"federation.rounds={args.rounds}",
            "data.split.method=iid", f"data.synthetic.examples_per_category={args.examples_per_category}",
            "data.test_fraction=0.05", "data.val_fraction=0.0",
            f"train.local_steps={args.local_steps}", f"train.batch_size={args.batch_size}",
            "eval.at_start=false", "eval.every=0", "eval.clients=false", "eval.max_examples=60",
            f"output.dir={out}", "output.progress=false", f"output.checkpoint_every={args.rounds}",
        ]
        start = time.perf_counter()
        summary = fedtune.run("default", overrides)
        wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "clients": n_clients, "wall": wall, "run_wall": summary["wall_seconds"],
        "train": summary["train_seconds"], "eval": summary["eval_seconds"],
        "overhead": summary["overhead_seconds"], "peak_mb": peak_kb / 1024,
        "adapter_bytes": summary["adapter_bytes"], "client_turns": n_clients * args.rounds,
        "bytes": summary["bytes_up"] + summary["bytes_down"],
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--examples-per-category", type=int, default=400)
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args)
        return

    rows = []
    for n in args.clients:
        cmd = [sys.executable, __file__, "--worker", str(n), "--rounds", str(args.rounds),
               "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
               "--examples-per-category", str(args.examples_per_category)]
        print(f"running {n} clients ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))

    print(f"\nLoRA on builtin:tiny, {args.rounds} rounds, {args.local_steps} local steps of "
          f"{args.batch_size} examples per client turn, every client in every round.\n"
          "setup = data, model and tokenization before round 1; overhead % is of the rounds' wall time\n")
    print("| clients | setup s | rounds wall s | training s | evaluation s | overhead s | overhead % "
          "| overhead ms / client turn | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pct = 100 * r["overhead"] / r["run_wall"]
        per_turn = 1000 * r["overhead"] / r["client_turns"]
        print(f"| {r['clients']} | {r['wall'] - r['run_wall']:.1f} | {r['run_wall']:.1f} | {r['train']:.1f} | {r['eval']:.1f} | "
              f"{r['overhead']:.2f} | {pct:.1f} | {per_turn:.1f} | {r['peak_mb']:.0f} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per_client = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (b["clients"] - a["clients"])
        print(f"\nmemory per extra client: {per_client / 1024:.0f} KB "
              f"(one adapter is {a['adapter_bytes'] / 1024:.0f} KB; "
              f"{per_client / a['adapter_bytes']:.2f} adapters)")


if __name__ == "__main__":
    main()
