"""FedEx on the built-in benchmark: one run in which the clients' learning rate (and, optionally,
local steps) is drawn from θ, against the same configurations run one by one. Prints θ after each
round, the configuration FedEx chose, its final figures, and (with `--fixed`, a tune_fidelity.py
result holding the fixed configurations of the same recipe) where the choice ranks among them.

    python benchmarks/fedex_choice.py                          # FedAvg base, lr in {1e-3, 3e-3, 1e-2, 3e-2}
    python benchmarks/fedex_choice.py --full --rounds 40 --fixed fidelity.json

One torch thread; `--full` keeps the default recipe's data and local steps (else the reduced
budget of tune_fidelity.py).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SMALL = ["data.synthetic.examples_per_category=60", "train.local_steps=5", "train.batch_size=8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="the default recipe's data and local steps")
    ap.add_argument("--base", default="fedavg")
    ap.add_argument("--schedule", default="auto")
    ap.add_argument("--eta", type=float, help="η₀ (default: FedEx's √(2 ln K))")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--fixed", metavar="JSON", help="tune_fidelity.py's result for the fixed configurations")
    ap.add_argument("--out", default="fedex_choice.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import fedtune

    options = {"base": args.base, "grid": {"train.lr": list(LRS)}, "schedule": args.schedule,
               **({"eta": args.eta} if args.eta else {})}
    overrides = [*([] if args.full else SMALL), f"federation.rounds={args.rounds}",
                 f"eval.every={args.eval_every}", "federation.algorithm=fedex",
                 f"federation.options={json.dumps(options)}", "output.progress=false",
                 "output.checkpoint_every=0"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = fedtune.run("default", [*overrides, f"output.dir={out}"])
        events = [json.loads(line) for line in
                  (Path(summary["final_adapter"]).parent / "metrics.jsonl").read_text().splitlines()]
    wall = time.perf_counter() - started
    thetas = {e["round"]: e["values"]["fedex_theta"] for e in events if e["kind"] == "round"}
    draws = [e["values"]["fedex_config"] for e in events if e["kind"] == "fit"]
    strategy, final = summary["strategy"], summary["final"]
    print(f"FedEx ({args.base} base, schedule {args.schedule}, η₀ {args.eta or 'default'}) on the "
          "built-in benchmark: "
          f"{' '.join(o for o in overrides if not o.startswith(('output.', 'federation.options')))}")
    print(f"\n{'round':>5}  " + "".join(f"{f'lr {lr:g}':>11}" for lr in LRS))
    for r in sorted(thetas):
        if r <= 3 or r % max(1, args.rounds // 10) == 0 or r == max(thetas):
            print(f"{r:>5}  " + "".join(f"{p:>11.3f}" for p in thetas[r]))
    counts = [draws.count(j) for j in range(len(LRS))]
    print("draws  " + "".join(f"{c:>11}" for c in counts))
    print(f"\nchosen: {strategy['fedex_best_config']} (θ {max(strategy['fedex_theta']):.3f}); "
          f"final val_loss {final.get('val_loss', math.nan):.4f}, exact match "
          f"{final.get('exact_match', math.nan):.3f}; {wall:.0f} s")
    result = {"overrides": overrides, "theta": thetas, "draws": counts, "final": final,
              "chosen": strategy["fedex_best_config"], "wall": wall}
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.fixed:
        fixed = json.loads(Path(args.fixed).read_text())
        rounds = fixed["rounds"]
        rows = [(r["label"], r["curve"][str(rounds)]) for r in fixed["results"]
                if "curve" in r and r["label"].startswith(args.base + "-lr")]
        print(f"\nthe same base at each fixed lr ({args.fixed}, {rounds} rounds):")
        print(f"{'configuration':<22}{'val_loss':>10}{'exact_match':>13}")
        for label, m in sorted(rows, key=lambda x: x[1].get("val_loss", math.inf)):
            print(f"{label:<22}{m.get('val_loss', math.nan):>10.4f}{m.get('exact_match', math.nan):>13.3f}")
        print(f"{'fedex':<22}{final.get('val_loss', math.nan):>10.4f}{final.get('exact_match', math.nan):>13.3f}")


if __name__ == "__main__":
    main()
