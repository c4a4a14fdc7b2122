"""Secure aggregation overhead: time and bytes per round versus plain FedAvg on the default recipe.

Each configuration runs in its own process (builtin:tiny, LoRA r=8 on all linear layers, the
synthetic benchmark; 10 clients use the iid split since 6 categories cannot go whole to 10),
without evaluation, and reports per round: wall seconds, the part of it spent in the protocol's later steps
(share exchange, masking, unmasking and the server's sum; the first step carries the clients'
training and key adverts), and the bytes each client sent and received.

    python benchmarks/privacy_secagg.py                      # 3 rounds x 2 local steps, 3 and 10 clients
    python benchmarks/privacy_secagg.py --rounds 5 --clients 3 5 10 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(overrides: list[str]) -> None:
    import fedtune

    with tempfile.TemporaryDirectory() as out:
        s = fedtune.run("default", [*overrides, f"output.dir={out}", "output.progress=false"])
        metrics = Path(s["final_adapter"]).parent / "metrics.jsonl"
        events = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [e["values"] for e in events if e["kind"] == "round"]
    print(json.dumps({"rounds": rounds, "adapter_bytes": s["adapter_bytes"]}))


def _run(overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *overrides],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(overrides)}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """`argv` defaults to the command line (benchmarks/privacy.py calls it with [])."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return
    common = [f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
              "eval.every=0", "eval.at_start=false", "eval.clients=false",
              f"output.checkpoint_every={args.rounds}"]
    print(f"builtin:tiny default recipe, {args.rounds} rounds x {args.local_steps} local steps; "
          "means over rounds; bytes per client per round\n")
    print("| clients | aggregation | s / round | protocol s / round | KB up / client | "
          "KB down / client | x up | x down |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.clients:
        split = [] if n <= 6 else ["data.split.method=iid"]
        plain_up = plain_down = None
        for secure in (False, True):
            overrides = [*common, *split, f"federation.clients={n}",
                         f"federation.secure_aggregation.enabled={str(secure).lower()}"]
            rounds = _run(overrides)["rounds"]
            seconds = sum(r["seconds"] for r in rounds) / len(rounds)
            protocol = "-"
            if secure:
                steps = [sum(v for k, v in r["secagg"]["seconds"].items() if k != "advert")
                         for r in rounds]
                protocol = f"{sum(steps) / len(steps):.3f}"
            up = sum(r["bytes_up"] for r in rounds) / len(rounds) / n
            down = sum(r["bytes_down"] for r in rounds) / len(rounds) / n
            if not secure:
                plain_up, plain_down = up, down
            ratio_up = f"{up / plain_up:.2f}" if plain_up else "-"
            ratio_down = f"{down / plain_down:.2f}" if plain_down else "-"
            label = "secure aggregation" if secure else "plain FedAvg"
            print(f"| {n} | {label} | {seconds:.3f} | {protocol} | {up / 1024:.1f} | {down / 1024:.1f} | "
                  f"{ratio_up} | {ratio_down} |", flush=True)


if __name__ == "__main__":
    main()
