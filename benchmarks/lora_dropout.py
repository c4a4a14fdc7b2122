"""Does the built-in default need LoRA dropout? The default recipe with and without it.

Runs the default recipe (builtin:tiny, 3 clients split by category, FedAvg) for `--rounds` rounds
with `adapter.dropout` 0.05 (the default) and 0, for each seed, interleaved, one process each,
and prints the final global exact match and loss and the wall time of the rounds.

    python benchmarks/lora_dropout.py                    # seeds 0 and 1, 20 rounds
    python benchmarks/lora_dropout.py --seeds 0 --rounds 10
"""

from __future__ import annotations

import argparse

from _worker import final_only, run_default, spawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.05, 0.0])
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        run_default(args.worker, ("final", "wall_seconds", "train_seconds"))
        return
    print(f"builtin:tiny default recipe, {args.rounds} rounds, FedAvg; final global test set\n")
    print("| seed | adapter.dropout | exact match % | loss | training s | wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        for dropout in args.dropouts:
            r, error = spawn(__file__, [*final_only(args.rounds), f"seed={seed}", f"adapter.dropout={dropout}"])
            if r is None:
                print(f"| {seed} | {dropout} | failed: {error} | | | |", flush=True)
                continue
            final = r["final"]
            print(f"| {seed} | {dropout} | {100 * final['exact_match']:.1f} | {final['loss']:.3f} "
                  f"| {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
