"""A `fedtune tune` study under a fixed budget: FedAdam on the built-in benchmark, tuning `train.lr`
and the server learning rate (TPE, median pruner, val_loss), by `--workers` processes sharing one
SQLite study; against the untuned default (FedAdam at the recipe's lr and its default server_lr),
run to the end beside them. Prints the trials, the best trial's exact match against the default's,
and the wall time pruning saved (each pruned trial's time scaled to the full rounds).

    python benchmarks/tune_study.py --trials 8 --workers 2 --rounds 10
    python benchmarks/tune_study.py --full --rounds 40 --eval-every 2 --workers 1 --baseline-default

`--baseline-default` takes the untuned default's figures from the study's trial 0 (the recipe's own
values, `tune.baseline`) instead of a separate run beside the study, saving one full run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SMALL = ["data.synthetic.examples_per_category=60", "train.local_steps=5", "train.batch_size=8"]


def recipe(rounds: int, trials: int, out: str, full: bool, steps: int | None,
           every: int = 1) -> tuple[dict, list[str]]:
    small = [o for o in SMALL if not (steps and o.startswith("train.local_steps="))]
    overrides = [*([] if full else small), *([f"train.local_steps={steps}"] if steps else []),
                 f"federation.rounds={rounds}", f"eval.every={every}",
                 "federation.algorithm=fedadam", f"output.dir={out}", "output.checkpoint_every=0"]
    tune = {"metric": "val_loss", "trials": trials, "sampler": "tpe",
            "pruner": {"name": "median_stopping", "startup_trials": 3, "warmup_rounds": max(1, rounds // 4)},
            "params": {"train.lr": {"type": "log_uniform", "low": 1e-4, "high": 3e-2},
                       "federation.options.server_lr": {"type": "log_uniform", "low": 1e-3, "high": 1.0}}}
    return tune, overrides


def worker(args: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    from fedtune.config import load_recipe
    from fedtune.tune import tune

    spec = json.loads(args[0])
    base = load_recipe("default", spec["overrides"]).model_dump(mode="json")
    base["tune"] = spec["tune"]
    tune(base, resume=spec["resume"])


def default_run(overrides: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    import fedtune

    started = time.perf_counter()
    s = fedtune.run("default", [*overrides, "output.progress=false"])
    print(json.dumps({"final": s["final"], "wall": time.perf_counter() - started}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--full", action="store_true", help="the default recipe's data and local steps")
    ap.add_argument("--local-steps", type=int, help="train.local_steps (default: 5, or 10 with --full)")
    ap.add_argument("--out", default="tune_study_runs")
    ap.add_argument("--eval-every", type=int, default=1, help="eval.every (the pruner's reports)")
    ap.add_argument("--baseline-default", action="store_true",
                    help="the untuned default's figures from trial 0 instead of a separate run")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    tune_spec, overrides = recipe(args.rounds, args.trials, str(out), args.full, args.local_steps,
                                  args.eval_every)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [sys.executable, __file__]
    started = time.perf_counter()
    untuned = None if args.baseline_default else subprocess.Popen(
        [*me, "--default", json.dumps(overrides)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    first = subprocess.run([*me, "--worker", json.dumps({"tune": {**tune_spec, "trials": 1},
                                                         "overrides": overrides, "resume": False})],
                           env=env, capture_output=True, text=True)   # creates the study
    if first.returncode != 0:
        sys.exit(first.stderr)
    workers = [subprocess.Popen([*me, "--worker", json.dumps({"tune": tune_spec, "overrides": overrides,
                                                              "resume": True})],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(args.workers)]
    for w in workers:
        _, err = w.communicate()
        if w.returncode != 0:
            print("worker failed:", err.strip().splitlines()[-1:])
    study_wall = time.perf_counter() - started
    default = None
    if untuned is not None:
        dout, derr = untuned.communicate()
        if untuned.returncode != 0:
            sys.exit(derr)
        default = json.loads(dout.strip().splitlines()[-1])
    report(out, default, study_wall, args, overrides)


def report(out: Path, default: dict | None, study_wall: float, args, overrides: list[str]) -> None:
    import optuna

    study_dir = out / "tune-default"
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{study_dir / 'study.db'}")
    print((study_dir / "trials.md").read_text() if (study_dir / "trials.md").exists() else "")
    rows = []
    for t in study.trials:
        rows.append({"state": t.state.name, "rounds": t.user_attrs.get("rounds"),
                     "wall": t.user_attrs.get("wall_seconds"),
                     "exact_match": (t.user_attrs.get("final") or {}).get("exact_match"),
                     "val_loss": (t.user_attrs.get("final") or {}).get("val_loss"), "params": t.params})
    if default is None:   # trial 0 ran the recipe's own values (tune.baseline)
        first = study.trials[0]
        default = {"final": first.user_attrs.get("final") or {}, "wall": first.user_attrs.get("wall_seconds")}
    done = [r for r in rows if r["wall"] is not None]
    spent = sum(r["wall"] for r in done)
    # A pruned trial's run to the end, estimated: its wall time per round times the rounds.
    full = sum(r["wall"] * args.rounds / r["rounds"] for r in done)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = min(complete, key=lambda r: r["val_loss"]) if complete else None
    best_em = max((r["exact_match"] or 0.0 for r in complete), default=None)
    shown = [o for o in overrides if not o.startswith(("output.", "federation.algorithm"))]
    print(f"\nFedAdam on the built-in benchmark ({' '.join(shown)}), "
          f"{args.trials} trials by {args.workers} workers + 1, "
          f"TPE + median pruner on val_loss; study wall {study_wall:.0f} s")
    print(f"{'':<36}{'val_loss':>10}{'exact_match':>13}")
    print(f"{'untuned default (lr 3e-3, server_lr 0.01)':<36}{default['final'].get('val_loss', float('nan')):>10.4f}"
          f"{default['final'].get('exact_match', float('nan')):>13.3f}")
    if best:
        shown = ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in best["params"].items())
        print(f"{'best trial (' + shown + ')':<36}{best['val_loss']:>10.4f}{best['exact_match']:>13.3f}")
        print(f"{'best exact match of any trial':<36}{'':>10}{best_em:>13.3f}")
    pruned = sum(r["state"] == "PRUNED" for r in rows)
    print(f"\ntrials: {len(rows)} ({pruned} pruned); trial wall time {spent:.0f} s with pruning, "
          f"{full:.0f} s estimated without (pruned trials scaled to {args.rounds} rounds): "
          f"{1 - spent / full:.0%} saved" if full else "no trial finished")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--default":
        default_run(json.loads(sys.argv[2]))
    else:
        main()
