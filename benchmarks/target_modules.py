"""Which LoRA target modules by default: all linear layers, q/v only, and q/v at the same size.

Runs the default recipe (builtin:tiny, 6 synthetic categories split by category over 3 clients,
FedAvg) for each configuration and seed, one process each, and prints the final global exact
match and loss. The third row gives q/v only as many trainable parameters as all-linear r=8, to
tell "which modules" apart from "how many parameters".

    python benchmarks/target_modules.py                   # 20 rounds, seeds 0 and 1
    python benchmarks/target_modules.py --rounds 10 --seeds 0
"""

from __future__ import annotations

import argparse

from _worker import final_only, run_default, spawn

CONFIGS: list[tuple[str, list[str]]] = [
    ("all linear layers, r=8", ["adapter.target_modules=all-linear", "adapter.r=8", "adapter.alpha=16"]),
    ("q/v only, r=8", ["adapter.target_modules=[q_proj,v_proj]", "adapter.r=8", "adapter.alpha=16"]),
    # 2 modules x 4 layers x 38 x (128 + 128) = 77,824, about the 78,848 of all-linear r=8
    ("q/v only, r=38 (same size)", ["adapter.target_modules=[q_proj,v_proj]", "adapter.r=38",
                                    "adapter.alpha=76"]),
]


def worker(overrides: list[str]) -> None:
    run_default(overrides, ("final", "adapter_parameters", "wall_seconds"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--only", help="run only the configurations whose label contains this")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    common = [*final_only(args.rounds), "adapter.method=lora"]
    print(f"builtin:tiny, default recipe, {args.rounds} rounds x 10 local steps of 16, lr 3e-3; "
          "final global test set\n")
    print("| target modules | seed | exact match | loss | trainable params | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, overrides in CONFIGS:
        if args.only and args.only not in label:
            continue
        for seed in args.seeds:
            r, error = spawn(__file__, [*common, *overrides, f"seed={seed}"])
            if r is None:
                print(f"| {label} | {seed} | failed: {error[:80]} | | | |", flush=True)
                continue
            f = r["final"]
            print(f"| {label} | {seed} | {f['exact_match']:.1%} | {f['loss']:.3f} | "
                  f"{r['adapter_parameters']:,} | {r['wall_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
