"""Personalised FL at small scale: does personalisation pay off with adapters on an LLM?

Three measurements on the shipped tiny model (CPU), printed as tables:

- bench: `fedtune bench` on the built-in benchmark (meta split: each client holds one task, so
  personalisation should matter), local-only, FedAvg, FedAvg + FT and every personalised method,
  with one holdout (unseen) client; the pFL-Bench columns (weighted mean, std, bottom 10 % of the
  clients' personal exact match and loss, the unseen client's adapted figures, bytes per round);
- dolly: the same on a Dolly-layout file (instruction / context / response / category, here
  written from the built-in tasks: no download), meta split by `category`;
- backdoor: client_0 poisons half its data with a trigger (the existing attack); attack success
  on the global test set (global model), on the attacker's personal model and the benign clients'
  personal models, with their clean exact match, for FedAvg, FT, Ditto, FedRep and FedSA-LoRA.

    python benchmarks/personalised.py                       # all three (long: run under nice)
    python benchmarks/personalised.py --only backdoor --rounds 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import fedtune
from fedtune.config import load_recipe
from fedtune.data.synthetic import generate_examples

METHODS = ["fedavg", "fedavg_ft", "ditto", "fedrep", "fedsa_lora", "ffa_lora", "pfedme", "pfedgate"]
BACKDOOR_METHODS = ["fedavg", "fedavg_ft", "ditto", "fedrep", "fedsa_lora"]


def base(args, out: Path, name: str) -> dict:
    return {
        "name": name, "seed": 0, "model": {"name": "builtin:tiny"},
        "data": {"source": "synthetic", "synthetic": {"examples_per_category": args.examples},
                 "template": "compact", "max_length": 128, "val_fraction": 0.0,
                 "test_fraction": 0.2, "split": {"method": "meta"}},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                    "target_modules": "all-linear"},
        "federation": {"clients": args.clients, "rounds": args.rounds, "holdout_clients": 1,
                       "holdout_steps": args.local_steps},
        "train": {"local_steps": args.local_steps, "batch_size": args.batch_size, "lr": args.lr},
        "eval": {"at_start": False, "every": 0, "max_new_tokens": 8, "batch_size": 64},
        "output": {"dir": str(out), "progress": False, "checkpoint_every": 0},
        "bench": {"algorithms": [m if m != "pfedme" else {"name": m, "options": {"inner_steps": 2}}
                                 for m in args.methods], "local_only": True, "centralised": False},
    }


def dolly_file(args, path: Path) -> Path:
    """The built-in tasks written in Dolly's layout (the category column drives the meta split)."""
    recipe = load_recipe({"data": {"synthetic": {"examples_per_category": args.examples}}})
    with path.open("w") as f:
        for ex in generate_examples(recipe.data.synthetic, 0):
            f.write(json.dumps({"instruction": ex.instruction, "context": ex.input,
                                "response": ex.output, "category": ex.category}) + "\n")
    return path


def run_bench(args, out: Path, name: str, recipe: dict) -> None:
    start = time.perf_counter()
    recipe["output"]["name"] = name
    result = fedtune.bench(recipe)
    print(f"\n### {name}: {time.perf_counter() - start:.0f} s, {result.dir}\n", flush=True)
    print((result.dir / "results.md").read_text(), flush=True)   # with the pFL-Bench table


def run_backdoor(args, out: Path) -> None:
    rows = []
    for method in [m for m in BACKDOOR_METHODS if m in args.methods]:
        recipe = base(args, out, f"backdoor-{method}")
        recipe["federation"].update(algorithm=method, holdout_clients=0, attack={
            "kind": "backdoor", "clients": ["client_0"], "poison_fraction": args.poison,
            "boost": args.boost})
        recipe.pop("bench")
        recipe["output"]["name"] = f"backdoor-{method}"
        s = fedtune.run(recipe)
        per = s["per_client"]
        benign = [c for c in per if c != "client_0"]

        def mean(key, clients, per=per):
            vals = [per[c].get(key) for c in clients if per[c].get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        rows.append((method, s["final"].get("backdoor_success"), per["client_0"].get("personal_backdoor_success",
                     per["client_0"].get("backdoor_success")),
                     mean("personal_backdoor_success", benign) if "personal_backdoor_success" in per[benign[0]]
                     else mean("backdoor_success", benign),
                     mean("personal_exact_match", benign) if "personal_exact_match" in per[benign[0]]
                     else mean("exact_match", benign), s["final"].get("exact_match")))
        print(f"backdoor {method}: done", flush=True)
    print(f"\n## Backdoor (client_0 poisons {args.poison:.0%} of its data, update x {args.boost:g}; "
          "trigger ' cf', target 'HACKED')\n")
    print("| method | ASR global model | ASR attacker's personal | ASR benign personal (mean) | "
          "benign personal EM | global EM |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, *vals in rows:
        print(f"| {method} | " + " | ".join("-" if v is None else f"{v:.1%}" for v in vals) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--examples", type=int, default=150, help="examples per task category")
    p.add_argument("--clients", type=int, default=6, help="clients of the meta split (one held out)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--poison", type=float, default=0.5, help="backdoor: share of the attacker's data")
    p.add_argument("--boost", type=float, default=1.0, help="backdoor: the attacker's update scale")
    p.add_argument("--only", choices=["bench", "dolly", "backdoor"], nargs="*")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fedtune-pfl-"))
    out.mkdir(parents=True, exist_ok=True)
    which = args.only or ["bench", "dolly", "backdoor"]
    print(f"rounds {args.rounds}, local steps {args.local_steps}, {args.examples} examples per "
          f"category, output {out}", flush=True)
    if "bench" in which:
        run_bench(args, out, "pfl-builtin", base(args, out, "pfl-builtin"))
    if "dolly" in which:
        recipe = base(args, out, "pfl-dolly")
        recipe["data"].update(source=str(dolly_file(args, out / "dolly-layout.jsonl")), format="dolly")
        recipe["data"].pop("synthetic")
        run_bench(args, out, "pfl-dolly", recipe)
    if "backdoor" in which:
        run_backdoor(args, out)


if __name__ == "__main__":
    main()
