"""Is low fidelity trustworthy here? A grid of configurations on the built-in benchmark, each run
to the end with an evaluation every round; the Spearman correlation between the ranking at 10 %,
25 % and 50 % of the rounds and the final ranking, for validation loss and exact match; and
Optuna's median pruner replayed on the recorded curves (what it would have stopped, the rounds
saved, whether the final best survives).

    python benchmarks/tune_fidelity.py                     # 4 lr x 3 algorithms = 12 configurations
    python benchmarks/tune_fidelity.py --rounds 10 --jobs 2 --out fidelity.json
    python benchmarks/tune_fidelity.py --table fidelity.json   # print the tables of a saved result
    python benchmarks/tune_fidelity.py --full --rounds 40 --eval-every 2 --jobs 1   # the full budget

Each configuration runs in a fresh interpreter (one torch thread); `--scale` overrides shrink the
benchmark to fit a CPU budget (they are printed with the tables).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LRS = (1e-3, 3e-3, 1e-2, 3e-2)
ALGORITHMS = {   # label -> overrides
    "fedavg": ["federation.algorithm=fedavg"],
    "fedavgm": ["federation.algorithm=fedavgm", "federation.options={server_lr: 1.0, momentum: 0.9}"],
    "fedadam": ["federation.algorithm=fedadam", "federation.options={server_lr: 0.01}"],
}
# Shrinks the default recipe to a CPU budget (the default: 300 examples per category, 10 local
# steps of 16, 40 rounds); printed with the results.
SMALL = ["data.synthetic.examples_per_category=60", "train.local_steps=5", "train.batch_size=8"]
FRACTIONS = (0.1, 0.25, 0.5)
METRICS = {"val_loss": False, "exact_match": True}   # metric -> higher is better


def worker(overrides: list[str]) -> None:
    """One configuration: print {round: metrics} of every evaluation as one JSON line."""
    import tempfile

    import torch

    torch.set_num_threads(1)
    import fedtune

    curve: dict[int, dict[str, float]] = {}

    def record(round_: int, metrics: dict) -> bool:
        curve[round_] = {k: float(metrics[k]) for k in METRICS if k in metrics}
        return False

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = fedtune.run("default", [*overrides, f"output.dir={out}", "output.progress=false",
                                          "output.checkpoint_every=0"], on_eval=record)
    final = summary.get("final") or {}
    curve[summary["rounds"]] = {k: float(final[k]) for k in METRICS if k in final}
    print(json.dumps({"curve": curve, "wall": time.perf_counter() - started}))


def run_config(label: str, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", *overrides], capture_output=True,
                          text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"label": label, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    curve = {int(r): m for r, m in out["curve"].items()}
    print(f"  {label}: {out['wall']:.0f} s, final {curve[max(curve)]}", flush=True)
    return {"label": label, "curve": curve, "wall": out["wall"]}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (ties share their mean rank); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def evaluated_round(results: list[dict], fraction: float, rounds: int) -> int:
    """The last round evaluated in every curve at or before `fraction` of the rounds."""
    want = max(1, round(fraction * rounds))
    common = set.intersection(*(set(res["curve"]) for res in results))
    return max((r for r in common if r <= want), default=min(common))


def correlations(results: list[dict], rounds: int) -> dict[str, dict[float, float]]:
    """metric -> {fraction: Spearman rho between the values at that round and at the end}."""
    out: dict[str, dict[float, float]] = {}
    for metric in METRICS:
        out[metric] = {}
        for f in FRACTIONS:
            r = evaluated_round(results, f, rounds)
            early = [res["curve"][r].get(metric) for res in results]
            final = [res["curve"][rounds].get(metric) for res in results]
            pairs = [(x, y) for x, y in zip(early, final) if x is not None and y is not None]
            out[metric][f] = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) > 2 else math.nan
    return out


def replay_median(results: list[dict], rounds: int, metric: str, startup: int, warmup: int,
                  orders: int, seed: int) -> dict:
    """Optuna's MedianPruner on the recorded curves, the configurations in `orders` random orders:
    mean share of rounds saved, and how often the final best configuration was pruned."""
    import random

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    higher = METRICS[metric]
    best = (max if higher else min)(results, key=lambda r: r["curve"][rounds][metric])["label"]
    rng = random.Random(seed)
    saved, lost, pruned_counts = [], 0, []
    for _ in range(orders):
        order = results[:]
        rng.shuffle(order)
        study = optuna.create_study(direction="maximize" if higher else "minimize",
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=startup,
                                                                       n_warmup_steps=warmup))
        run_rounds, pruned = 0, []
        for res in order:
            trial = study.ask()
            stop = rounds
            for r in sorted(k for k in res["curve"] if k < rounds):   # the evaluated rounds
                trial.report(res["curve"][r][metric], r)
                if trial.should_prune():
                    stop = r
                    break
            run_rounds += stop
            if stop < rounds:
                pruned.append(res["label"])
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, res["curve"][rounds][metric])
        saved.append(1 - run_rounds / (rounds * len(order)))
        lost += best in pruned
        pruned_counts.append(len(pruned))
    return {"metric": metric, "best": best, "rounds_saved": sum(saved) / orders,
            "best_pruned": lost / orders, "pruned_mean": sum(pruned_counts) / orders}


def print_tables(data: dict) -> None:
    rounds, results = data["rounds"], [r for r in data["results"] if "curve" in r]
    print(f"\nbuilt-in benchmark ('default' recipe) with {' '.join(data['overrides'])} "
          f"federation.rounds={rounds} eval.every={data.get('eval_every', 1)}; {len(results)} configurations "
          f"({len(data['results']) - len(results)} failed), {data['wall']:.0f} s in all")
    print("\nfinal values (ranked by val_loss)")
    print(f"{'configuration':<22}{'val_loss':>10}{'exact_match':>13}{'wall s':>9}")
    for res in sorted(results, key=lambda r: r["curve"][rounds].get("val_loss", math.inf)):
        m = res["curve"][rounds]
        print(f"{res['label']:<22}{m.get('val_loss', math.nan):>10.4f}{m.get('exact_match', math.nan):>13.3f}"
              f"{res['wall']:>9.0f}")
    corr = correlations(results, rounds)
    print("\nSpearman rho, ranking at a share of the rounds vs the final ranking")
    print(f"{'metric':<14}" + "".join(f"{f'{int(f * 100)} % (r{evaluated_round(results, f, rounds)})':>14}"
                                      for f in FRACTIONS))
    for metric, row in corr.items():
        print(f"{metric:<14}" + "".join(f"{row[f]:>14.3f}" if math.isfinite(row[f]) else f"{'n/a':>14}"
                                        for f in FRACTIONS))
    print("(n/a: every configuration has the same value at that round or at the end, so no ranking)")
    print("\nOptuna MedianPruner replayed on these curves (20 random orders of the configurations)")
    print(f"{'metric':<14}{'startup':>8}{'warmup':>8}{'pruned':>8}{'rounds saved':>14}{'best pruned':>13}")
    for metric in METRICS:
        for startup, warmup in ((3, 0), (3, max(1, rounds // 4)), (5, max(1, rounds // 2))):
            rep = replay_median(results, rounds, metric, startup, warmup, orders=20, seed=0)
            print(f"{metric:<14}{startup:>8}{warmup:>8}{rep['pruned_mean']:>8.1f}"
                  f"{rep['rounds_saved']:>13.0%}{rep['best_pruned']:>13.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="configurations run at once")
    ap.add_argument("--eval-every", type=int, default=1, help="eval.every: evaluate every N rounds")
    ap.add_argument("--full", action="store_true", help="the default recipe's data and local steps")
    ap.add_argument("--local-steps", type=int, help="train.local_steps (default: 5, or 10 with --full)")
    ap.add_argument("--out", default="tune_fidelity.json")
    ap.add_argument("--table", metavar="JSON", help="print the tables of a saved result and exit")
    args = ap.parse_args()
    scale = [] if args.full else SMALL
    if args.local_steps:
        scale = [*[o for o in scale if not o.startswith("train.local_steps=")],
                 f"train.local_steps={args.local_steps}"]
    if args.table:   # a saved result, or the .partial.jsonl of an unfinished one (with its --rounds)
        text = Path(args.table).read_text()
        if args.table.endswith(".jsonl"):
            results = [_int_rounds(json.loads(line)) for line in text.splitlines() if line.strip()]
            data = {"rounds": args.rounds, "overrides": scale, "wall": math.nan, "results": results,
                    "eval_every": args.eval_every}
        else:
            data = json.loads(text, object_hook=_int_rounds)
        print_tables(data)
        return
    base = [*scale, f"federation.rounds={args.rounds}", f"eval.every={args.eval_every}"]
    configs = [(f"{alg}-lr{lr:g}", [*base, *extra, f"train.lr={lr}"])
               for (alg, extra), lr in itertools.product(ALGORITHMS.items(), LRS)]
    random.Random(0).shuffle(configs)   # a partial result (see .partial.jsonl) spans the grid
    print(f"{len(configs)} configurations, {args.jobs} at a time: {' '.join(base)}", flush=True)
    started = time.perf_counter()
    partial = Path(args.out).with_suffix(".partial.jsonl")   # each configuration as it finishes
    partial.write_text("")

    def one(config: tuple[str, list[str]]) -> dict:
        result = run_config(*config)
        with open(partial, "a") as f:
            f.write(json.dumps(result) + "\n")
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, configs))
    data = {"rounds": args.rounds, "overrides": scale, "wall": time.perf_counter() - started,
            "results": results, "eval_every": args.eval_every}
    Path(args.out).write_text(json.dumps(data, indent=1))
    print_tables(data)


def _int_rounds(obj: dict) -> dict:
    if "curve" in obj:
        obj["curve"] = {int(r): m for r, m in obj["curve"].items()}
    return obj


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
