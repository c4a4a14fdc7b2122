"""Privacy and robustness on the built-in benchmark: accuracy vs epsilon, accuracy under attack.

Three sections, every configuration one process (builtin:tiny, LoRA on all linear layers, the
synthetic 6-task benchmark split iid, AdamW lr 3e-3, batch 16; final global test set of 180):

- `dp`: DP-FedAvg (client-level) at a few noise multipliers, and local DP-SGD (example-level,
  Opacus) at two, on 10 clients with 5 sampled per round; epsilon at delta = 1e-5.
- `attacks`: one hostile client of 5 (scale x10, sign flip x10, NaN, backdoor, backdoor boosted x5
  by model replacement) against FedAvg and each robust aggregator; exact match, and each
  backdoor's attack success rate.
- `secagg`: secure aggregation's time and bytes against plain FedAvg (benchmarks/privacy_secagg.py).

Workers run with one torch thread each (OMP_NUM_THREADS=1): on a shared 2-core machine, torch's
default thread pool spins against other processes and runs many times slower.

    python benchmarks/privacy.py                          # all sections (~30 min on 2 cores)
    python benchmarks/privacy.py --section attacks --only backdoor --rounds 4
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

AGGREGATORS = [
    ("fedavg", []),
    ("median", []),
    ("trimmed_mean (β 0.2)", ["federation.options={trim_ratio: 0.2}"]),
    ("krum (f 1)", ["federation.options={byzantine: 1, multi: 1}"]),
    ("norm_bounding (4.0)", ["federation.options={max_norm: 4.0}"]),
]
ATTACKS = [
    ("none", []),
    ("scale ×10", ["federation.attack={clients: [client_4], kind: scale, factor: 10.0}"]),
    ("sign_flip ×10", ["federation.attack={clients: [client_4], kind: sign_flip, factor: 10.0}"]),
    ("nan", ["federation.attack={clients: [client_4], kind: nan}"]),
    ("backdoor", ["federation.attack={clients: [client_4], kind: backdoor, poison_fraction: 0.5}"]),
    ("boosted backdoor ×5", ["federation.attack={clients: [client_4], kind: backdoor, "
                             "poison_fraction: 0.5, boost: 5.0}"]),
]
CLIP = 2.0   # DP-FedAvg clip norm; honest first-round updates have norm ~4 here
DP = [
    ("no DP (fedavg, uniform weights)", ["federation.options={weighting: uniform}"]),
    *[(f"DP-FedAvg C={CLIP:g}, z={z:g}",
       ["federation.algorithm=dp_fedavg",
        f"federation.options={{clip_norm: {CLIP}, noise_multiplier: {z}, noise_seed: 1}}"])
      for z in (0.0, 0.05, 0.3)],
    *[(f"DP-SGD C=1, σ={s:g}",
       [f"train.dp_sgd={{noise_multiplier: {s}, max_grad_norm: 1.0, noise_seed: 1}}"])
      for s in (0.5, 1.0)],
]


def worker(overrides: list[str]) -> None:
    import fedtune

    with tempfile.TemporaryDirectory() as out:
        s = fedtune.run("default", [*overrides, f"output.dir={out}", "output.progress=false"])
    print(json.dumps({k: s.get(k) for k in ("final", "strategy", "dp_sgd", "missing_updates",
                                            "wall_seconds")}))


def run(args, overrides: list[str]) -> dict | str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--worker", *overrides],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def common(rounds: int, steps: int) -> list[str]:
    return [f"federation.rounds={rounds}", f"train.local_steps={steps}", "data.split.method=iid",
            "eval.every=0", "eval.at_start=false", "eval.clients=false", "output.checkpoint_every=0"]


def section_dp(args) -> None:
    base = [*common(args.rounds, args.steps), "federation.clients=10", "federation.clients_per_round=5"]
    print(f"### accuracy vs ε: 10 clients (iid, ~153 training examples each), 5 sampled per round, "
          f"{args.rounds} rounds × {args.steps} local steps; δ = 1e-5\n")
    print("| configuration | exact match | loss | ε (δ=1e-5) | unit protected | noise std per step | wall s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for label, extra in DP:
        if args.only and not any(w in label for w in args.only):
            continue
        start = time.time()
        r = run(args, [*base, *extra])
        if isinstance(r, str):
            print(f"| {label} | {r} | | | | | {time.time() - start:.0f} |", flush=True)
            continue
        f = r["final"]
        if "DP-FedAvg" in label:
            eps, unit = (r["strategy"] or {}).get("epsilon"), "a client's whole data"
            z = float(label.rsplit("=", 1)[1])
            noise = f"{z * CLIP / 5:.3g} per coordinate of the global update"
        elif "DP-SGD" in label:
            eps, unit = (r["dp_sgd"] or {}).get("max_epsilon"), "one training example"
            s = float(label.rsplit("=", 1)[1])
            noise = f"{s * 1.0 / 16:.3g} per coordinate of the local gradient"
        else:
            eps, unit, noise = None, "nothing", "0"
        eps_text = "∞" if eps is None else f"{eps:.3g}"
        print(f"| {label} | {f['exact_match']:.1%} | {f['loss']:.3f} | {eps_text} | {unit} | {noise} | "
              f"{r['wall_seconds']:.0f} |", flush=True)
    print()


def section_attacks(args) -> None:
    base = [*common(args.rounds, args.steps), "federation.clients=5"]
    print(f"### one hostile client of 5 (client_4; iid split, all clients every round, "
          f"{args.rounds} rounds × {args.steps} local steps): final exact match (test loss); for the "
          "backdoor also its attack success rate (triggered test prompts answered with the target)\n")
    attacks = [(a, o) for a, o in ATTACKS if not args.only or any(w in a for w in args.only)]
    backdoors = [a for a, _ in attacks if "backdoor" in a]
    print("| aggregator | " + " | ".join(a for a, _ in attacks)
          + "".join(f" | {a} success" for a in backdoors) + " |")
    print("|---|" + "---:|" * (len(attacks) + len(backdoors)))
    for agg, agg_extra in AGGREGATORS:
        if args.aggregators and not any(w in agg for w in args.aggregators):
            continue
        cells, success = [], {}
        for attack, attack_extra in attacks:
            r = run(args, [*base, f"federation.algorithm={agg.split()[0]}", *agg_extra, *attack_extra])
            if isinstance(r, str):
                cells.append(r)
                continue
            cells.append(f"{r['final']['exact_match']:.1%} ({r['final']['loss']:.2f})")
            if attack in backdoors:
                success[attack] = r["final"].get("backdoor_success")
        tail = "".join(f" | {success[a]:.1%}" if success.get(a) is not None else " | -" for a in backdoors)
        print(f"| {agg} | " + " | ".join(cells) + tail + " |", flush=True)
    print()


def section_secagg() -> None:
    """Secure aggregation's overhead: benchmarks/privacy_secagg.py with its defaults."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import privacy_secagg

    os.environ.setdefault("OMP_NUM_THREADS", "1")   # its workers inherit the environment
    print("### secure aggregation overhead (benchmarks/privacy_secagg.py)\n")
    privacy_secagg.main([])
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=["dp", "attacks", "secagg", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=None, help="default: 10 (dp), 6 (attacks)")
    ap.add_argument("--steps", type=int, default=None, help="local steps; default 8 (dp), 6 (attacks)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="only configurations (dp) or attacks whose label contains one of these")
    ap.add_argument("--aggregators", nargs="*", default=None,
                    help="attacks section: only aggregators whose label contains one of these")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    started = time.time()
    print("builtin:tiny + LoRA (all linear), synthetic benchmark split iid, AdamW lr 3e-3, batch 16; "
          "final global test set (180 examples)\n")
    if args.section in ("dp", "all"):
        section_dp(argparse.Namespace(**{**vars(args), "rounds": args.rounds or 10,
                                          "steps": args.steps or 8}))
    if args.section in ("attacks", "all"):
        section_attacks(argparse.Namespace(**{**vars(args), "rounds": args.rounds or 6,
                                               "steps": args.steps or 6}))
    if args.section in ("secagg", "all"):
        section_secagg()
    print(f"total wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
