"""fedtune's simulation against the sequential "ideal" loop, on one workload, side by side.

The workload (built here, no download): a random 4-layer Llama of hidden size 256 with the shipped
tokenizer, LoRA r=8 on q/v (dropout 0), 64 examples per client (short arithmetic and copying
tasks written by this script: the built-in synthetic benchmark has too few distinct examples for
1000 clients), 10 local steps of batch 8 (AdamW, clipping at 1.0), 10 clients per round, 3 rounds.

The ideal is the plain program a person would write: one process, one model, a PyTorch loop over
the round's clients in turn (each client's examples tokenized when it is first sampled, the same
tokenization and split as fedtune so the batches are identical), FedAvg by hand, no checks, no
messages, no files. fedtune runs the same recipe (its one final evaluation is capped at 8 examples
and shown apart). Every configuration runs in its own process (so its peak resident memory is
its own), interleaved with the others, `--repeats` times; the tables show medians.

    python benchmarks/simulation_speed.py                       # 10, 50, 1000 clients; K = 1, 2, 5, 10
    python benchmarks/simulation_speed.py --clients 10 --parallel 1 5 --repeats 1 --rounds 1
    python benchmarks/simulation_speed.py --clients 10 --parallel 1 5 --whole-rows 5 --padded 5

`--whole-rows K` runs the batched step without running a sub-batch's shared prompt prefix once
per client, `--padded K` also as one batch padded to its widest example (the A/B of each layout).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.perf_counter()   # the worker's clock starts before torch is imported

PER_CLIENT, STEPS, BATCH, ROUNDS, PER_ROUND, LR, SEED = 64, 10, 8, 3, 10, 1e-3, 0
TEST_FRACTION = 0.02


def make_model(directory: str) -> None:
    """A random 4-layer Llama (hidden 256) with the shipped tokenizer, saved to `directory`."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import fedtune

    assets = Path(fedtune.__file__).parent / "assets" / "tiny"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets / name, Path(directory) / name)
    tok = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).save_pretrained(directory)


def make_data(directory: str, clients: int) -> str:
    """Alpaca-layout rows, enough for `clients` x 64 training examples (the synthetic benchmark
    has too few distinct examples for 1000 clients): small arithmetic and copying tasks."""
    import random
    from pathlib import Path

    rng = random.Random(SEED)
    path = Path(directory) / "data.jsonl"
    rows = math.ceil(PER_CLIENT * clients / (1 - TEST_FRACTION)) + 10
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randrange(1000), rng.randrange(1000)
            task = rng.randrange(3)
            if task == 0:
                row = {"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}
            elif task == 1:
                row = {"instruction": "Repeat the word.", "input": f"w{a}x{b}", "output": f"w{a}x{b}"}
            else:
                row = {"instruction": f"What is {a} minus {b}?", "input": "", "output": str(a - b)}
            f.write(json.dumps(row) + "\n")
    return str(path)


def recipe(model_dir: str, out: str, clients: int, parallel: int, rounds: int = ROUNDS,
           max_length: int = 128, steps: int = STEPS, data: str | None = None) -> dict:
    per_category = math.ceil(PER_CLIENT * clients / (6 * (1 - TEST_FRACTION))) + 1
    source = ({"source": "synthetic", "synthetic": {"examples_per_category": per_category}}
              if data is None else {"source": data, "format": "alpaca",
                                    "max_examples": math.ceil(PER_CLIENT * clients / (1 - TEST_FRACTION)) + 1})
    return {
        "name": "speed", "seed": SEED, "model": {"name": model_dir},
        "data": {**source, "template": "compact", "max_length": max_length, "test_fraction": TEST_FRACTION,
                 "val_fraction": 0.0, "split": {"method": "iid"}},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                    "target_modules": ["q_proj", "v_proj"]},
        "federation": {"clients": clients, "clients_per_round": min(PER_ROUND, clients),
                       "rounds": rounds, "parallel_clients": parallel},
        "train": {"local_steps": steps, "batch_size": BATCH, "lr": LR, "precision": "fp32"},
        "eval": {"every": 0, "at_start": False, "clients": False, "max_examples": 8,
                 "max_new_tokens": 1},
        "output": {"dir": out, "progress": False, "checkpoint_every": rounds},
    }


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fedtune(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import fedtune

    if args.worker == "padded":   # batched steps as one batch padded to its widest example
        from fedtune.train import multi_lora

        multi_lora.CPU_GROUP_COST = 1 << 40
    if args.worker in ("padded", "whole"):   # every row runs whole (no shared prefix run once per client)
        from fedtune.train import multi_lora

        multi_lora.SHARE_PREFIX = False
    with tempfile.TemporaryDirectory() as out:
        summary = fedtune.run(recipe(args.model_dir, out, args.clients, args.parallel, args.rounds,
                                     args.max_length, args.steps, args.data))
    total = time.perf_counter() - STARTED
    return {"total": total, "rounds": summary["wall_seconds"] - summary["eval_seconds"],
            "startup": total - summary["wall_seconds"], "eval": summary["eval_seconds"],
            "peak_mb": peak_mb()}


def run_ideal(args: argparse.Namespace) -> dict:
    """One model, the round's clients one after another, FedAvg by hand."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.config import load_recipe
    from fedtune.data.federated import build_federated_data
    from fedtune.data.prompts import collate, tokenize_examples

    torch.set_num_threads(args.threads)
    section = load_recipe(recipe(args.model_dir, "/tmp", args.clients, 1, args.rounds, args.max_length,
                                   args.steps, args.data)).data
    data = build_federated_data(section, args.clients, SEED)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(SEED)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model_dir),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_state = {n: p.detach().clone() for n, p in params.items()}
    tokenized: dict[str, list] = {}
    names = list(data.clients)
    rounds_start = time.perf_counter()
    startup = rounds_start - STARTED
    for round_ in range(1, args.rounds + 1):
        rng = np.random.default_rng([SEED, round_])
        chosen = sorted(rng.choice(len(names), size=min(PER_ROUND, len(names)), replace=False).tolist())
        total = {n: torch.zeros_like(t) for n, t in global_state.items()}
        weight = 0
        for i in chosen:
            name = names[i]
            if name not in tokenized:
                tokenized[name] = tokenize_examples(data.clients[name].train, tok, template="compact",
                                                    max_length=args.max_length)[0]
            examples = tokenized[name]
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(global_state[n])
            optimizer = torch.optim.AdamW(list(params.values()), lr=LR)
            order = np.random.default_rng([SEED, round_, i]).permutation(len(examples)).tolist()
            model.train()
            for step in range(args.steps):
                at = (step * BATCH) % len(examples)
                batch = collate([examples[j] for j in order[at:at + BATCH]], tok.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.eval()
            for n, p in params.items():
                total[n] += p.detach() * len(examples)
            weight += len(examples)
        global_state = {n: t / weight for n, t in total.items()}
    rounds = time.perf_counter() - rounds_start
    return {"total": time.perf_counter() - STARTED, "rounds": rounds, "startup": startup, "eval": 0.0,
            "peak_mb": peak_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 1000])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 5, 10],
                    help="federation.parallel_clients values, run at the first --clients size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--steps", type=int, default=STEPS, help="local steps per client turn")
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=128, help="data.max_length (tokens per example)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--padded", type=int, nargs="*", default=[], metavar="K",
                    help="also run these K (> 1) with the batched step as one padded batch (no length sub-batches)")
    ap.add_argument("--whole-rows", type=int, nargs="*", default=[], metavar="K",
                    help="also run these K (> 1) with every row run whole (the shared prompt prefix not run once per client)")
    ap.add_argument("--worker", choices=["fedtune", "ideal", "padded", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--parallel-one", dest="parallel_k", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        args.clients, args.parallel = args.clients[0], args.parallel_k
        result = run_ideal(args) if args.worker == "ideal" else run_fedtune(args)
        print(json.dumps(result))
        return

    configs = [("ideal", n, 1) for n in args.clients] + [("fedtune", n, 1) for n in args.clients]
    configs += [("fedtune", args.clients[0], k) for k in args.parallel if k != 1]
    configs += [("padded", args.clients[0], k) for k in args.padded if k != 1]
    configs += [("whole", args.clients[0], k) for k in args.whole_rows if k != 1]
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as model_dir:
        make_model(model_dir)
        data = make_data(model_dir, max(args.clients))
        for rep in range(args.repeats):
            for kind, n, k in configs:   # interleaved: each repeat runs every configuration once
                print(f"repeat {rep + 1}: {kind} {n} clients K={k} ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", model_dir,
                       "--clients", str(n), "--parallel-one", str(k), "--threads", str(args.threads),
                       "--rounds", str(args.rounds), "--max-length", str(args.max_length),
                       "--steps", str(args.steps), "--data", data]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"  failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                    continue
                results[(kind, n, k)].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def med(kind, n, k, key):
        found = [r[key] for r in results[(kind, n, k)]]
        return statistics.median(found) if found else float("nan")

    import torch

    device = "cpu"
    print(f"\n# Simulation speed on {device} ({args.threads} threads): 4-layer Llama (hidden 256), LoRA r=8 "
          f"q/v, {PER_CLIENT} examples per client, {args.steps} local steps of batch {BATCH}, "
          f"{PER_ROUND} clients per round, {args.rounds} rounds, examples of at most {args.max_length} tokens; medians of {args.repeats}, interleaved. "
          f"torch {torch.__version__}.\n")
    print("| clients | fedtune total ÷ ideal | rounds ÷ ideal | peak memory ÷ ideal "
          "| start-up s fedtune / ideal | rounds s fedtune / ideal | peak MB fedtune / ideal | fedtune final eval s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.clients:
        f = {key: med("fedtune", n, 1, key) for key in ("total", "rounds", "startup", "eval", "peak_mb")}
        i = {key: med("ideal", n, 1, key) for key in ("total", "rounds", "startup", "peak_mb")}
        print(f"| {n} | {f['total'] / i['total']:.2f} | {f['rounds'] / i['rounds']:.2f} "
              f"| {f['peak_mb'] / i['peak_mb']:.2f} | {f['startup']:.1f} / {i['startup']:.1f} "
              f"| {f['rounds']:.1f} / {i['rounds']:.1f} | {f['peak_mb']:.0f} / {i['peak_mb']:.0f} "
              f"| {f['eval']:.1f} |")
    n = args.clients[0]
    ideal_rounds = med("ideal", n, 1, "rounds")
    print(f"\n# Batched multi-client training (federation.parallel_clients = K) at {n} clients\n")
    print("| K | batched step | rounds s | throughput ÷ ideal | peak MB | peak memory ÷ ideal |")
    print("|---:|---|---:|---:|---:|---:|")
    for k in sorted({1, *args.parallel, *args.padded, *args.whole_rows}):
        for kind, how in (("fedtune", "length sub-batches, shared prefix once per client" if k > 1 else "-"),
                          ("whole", "length sub-batches, whole rows"), ("padded", "one padded batch, whole rows")):
            if (kind, n, k) not in results:
                continue
            rounds, peak = med(kind, n, k, "rounds"), med(kind, n, k, "peak_mb")
            print(f"| {k} | {how} | {rounds:.1f} | {ideal_rounds / rounds:.2f} | {peak:.0f} "
                  f"| {peak / med('ideal', n, 1, 'peak_mb'):.2f} |")
    for rep in range(args.repeats):   # the same ratios within each interleaved repeat (a shared machine)
        ideal = results[("ideal", n, 1)][rep]["rounds"] if len(results[("ideal", n, 1)]) > rep else None
        cells = [f"{kind} K={k}: {ideal / results[(kind, n, k)][rep]['rounds']:.2f}"
                 for kind, m, k in configs if m == n and kind != "ideal" and len(results[(kind, n, k)]) > rep]
        if ideal is not None:
            print(f"repeat {rep + 1}, throughput ÷ ideal: " + ", ".join(cells))
    print("\nthroughput ÷ ideal: the ideal's time for the rounds divided by fedtune's (above 1: faster "
          "than the ideal). Start-up: process start (imports included) to round 1.")


if __name__ == "__main__":
    main()
