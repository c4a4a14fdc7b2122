"""Adapter methods, aggregators and update codecs compared on the built-in benchmark.

Every configuration runs the default recipe (builtin:tiny, 6 synthetic task categories split by
category over 3 clients) with the same budget of rounds and local steps, one process each, and
reports the final global exact match, loss and the bytes that travelled.

    python benchmarks/algorithms.py                  # everything (about 30-40 min on 2 cores)
    python benchmarks/algorithms.py --group codecs --rounds 10
"""

from __future__ import annotations

import argparse
import time

from _worker import final_only, run_default, spawn

LORA = ["adapter.method=lora"]
GROUPS: dict[str, list[tuple[str, list[str]]]] = {
    "adapters": [
        ("LoRA r=8, all linear layers", LORA),
        ("LoRA r=8, q/v only (peft default)", [*LORA, "adapter.target_modules=auto"]),
        ("LoHa r=8, q/v", ["adapter.method=loha", "adapter.options={r: 8, target_modules: [q_proj, v_proj]}",
                            "train.lr=0.01"]),
        ("IA3", ["adapter.method=ia3", "train.lr=0.03"]),
        ("prompt tuning, 16 tokens", ["adapter.method=prompt_tuning",
                                      "adapter.options={num_virtual_tokens: 16}", "train.lr=0.03"]),
        ("P-tuning, 16 tokens", ["adapter.method=p_tuning",
                                 "adapter.options={num_virtual_tokens: 16, encoder_hidden_size: 64}",
                                 "train.lr=0.01"]),
        ("prefix tuning, 16 tokens", ["adapter.method=prefix_tuning",
                                      "adapter.options={num_virtual_tokens: 16}", "train.lr=0.01"]),
        ("full fine-tuning", ["adapter.method=full", "train.lr=0.001"]),
    ],
    "aggregators": [
        (name, [f"federation.algorithm={name}", *extra])
        for name, extra in [
            ("fedavg", []), ("fedprox", ["federation.options={mu: 0.01}"]), ("fedavgm", []),
            ("fedadam", []), ("fedyogi", []), ("fedadagrad", []), ("scaffold", []),
            ("flexlora", []), ("median", []), ("trimmed_mean", []),
            ("krum", ["federation.options={byzantine: 0, multi: 1}"]),
            ("norm_bounding", ["federation.options={max_norm: 0.5}"]),
        ]
    ] + [
        ("fedavg, SGD lr 0.3", ["train.optimizer=sgd", "train.lr=0.3"]),
        ("scaffold, SGD lr 0.3", ["federation.algorithm=scaffold", "train.optimizer=sgd", "train.lr=0.3"]),
        ("fedmezo (zeroth-order), lr 1e-3, alpha 5e-4",
         ["federation.algorithm=fedmezo", "train.lr=0.001", "federation.options={alpha: 0.0005}"]),
        ("dp_fedavg, C=1, z=0.5", ["federation.algorithm=dp_fedavg",
                                   "federation.options={clip_norm: 1.0, noise_multiplier: 0.5}"]),
    ],
    "codecs": [
        (f"up {up}{extra.replace(', topk_ratio: ', ' ')}, down {down}",
         [f"federation.compression.up={{method: {up}{extra}}}",
                                   f"federation.compression.down.method={down}"])
        for up, extra, down in [
            ("none", "", "none"), ("fp16", "", "fp16"), ("bf16", "", "bf16"), ("int8", "", "int8"),
            ("topk", ", topk_ratio: 0.1", "none"), ("topk", ", topk_ratio: 0.01", "none"),
        ]
    ],
}


def worker(overrides: list[str]) -> None:
    run_default(overrides, ("final", "bytes_up", "bytes_down", "adapter_parameters", "wall_seconds"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", choices=[*GROUPS, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="run only configurations whose label contains one of these")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    common = final_only(args.rounds)
    groups = list(GROUPS) if args.group == "all" else [args.group]
    print(f"builtin:tiny, synthetic benchmark (meta split, 3 clients), {args.rounds} rounds × 10 local "
          "steps of 16, lr 3e-3 unless stated; final global test set (180 examples)\n")
    for group in groups:
        print(f"### {group}\n")
        print("| configuration | exact match | loss | MB up | MB down | trainable params | wall s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, overrides in GROUPS[group]:
            if args.only and not any(word in label for word in args.only):
                continue
            start = time.time()
            r, error = spawn(__file__, [*common, *overrides])
            if r is None:
                print(f"| {label} | failed: {error[:80]} | | | | | {time.time() - start:.0f} |", flush=True)
                continue
            f = r["final"]
            print(f"| {label} | {f['exact_match']:.1%} | {f['loss']:.3f} | {r['bytes_up'] / 1e6:.2f} | "
                  f"{r['bytes_down'] / 1e6:.2f} | {r['adapter_parameters']:,} | {r['wall_seconds']:.0f} |",
                  flush=True)
        print()


if __name__ == "__main__":
    main()
