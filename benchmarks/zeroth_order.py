"""Zeroth-order and offsite methods: step memory, bytes per round, offsite emulator vs plug-in.

Part 1, peak memory of one local step: FedKSeed (zeroth-order, all parameters), FedMeZO
(zeroth-order, LoRA), backprop LoRA and inference alone.

Each mode runs in its own process on the same randomly initialised Llama-architecture model
(built from a config, no download). The kernel's peak-RSS counter is reset just before the step
(`/proc/self/clear_refs`, Linux), so the figure is the step's own peak above the loaded model.

    python benchmarks/zeroth_order.py                       # ~30M-parameter model, batch 8 × 256
    python benchmarks/zeroth_order.py --hidden 256 --layers 4

Part 2, bytes per client per round of FedAvg (LoRA), FedMeZO (LoRA), FedKSeed (K = 4096) and
offsite-tuning on the built-in benchmark (one short round each). Part 3, offsite-tuning on the
built-in benchmark: the emulator clients tuned versus the full model with the adapter plugged in.

    python benchmarks/zeroth_order.py --part memory|bytes|offsite [--offsite-rounds 20] [--offsite-distill 0 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _model import status_mb


def worker(mode: str, args: argparse.Namespace) -> None:
    import gc

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.train.zeroth_order import apply_zo_update, projected_gradient

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg)
    if mode != "fedkseed":
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(4, 100, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW(params, lr=1e-4) if mode == "backprop" else None
    gc.collect()
    base = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    start = time.perf_counter()
    if mode == "inference":
        with torch.no_grad():
            model(**batch)
    elif mode == "backprop":
        model.train()
        model(**batch).loss.backward()
        opt.step()
    else:
        model.eval()
        g, _ = projected_gradient(model, params, batch, seed=1, eps=1e-3)
        apply_zo_update(params, seed=1, grad=g, lr=1e-4)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "base_mb": base, "peak_mb": status_mb("VmHWM"), "seconds": seconds,
                      "params": sum(p.numel() for p in model.parameters()),
                      "trainable": sum(p.numel() for p in params)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["all", "memory", "bytes", "offsite"], default="all")
    ap.add_argument("--offsite-rounds", type=int, default=20)
    ap.add_argument("--offsite-distill", type=int, nargs="+", default=[0, 200],
                    help="distillation steps of each offsite run (0: none)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    rows = []
    if args.part in ("all", "bytes"):
        bytes_table()
    if args.part in ("all", "offsite"):
        offsite_table(args.offsite_rounds, args.offsite_distill)
    if args.part not in ("all", "memory"):
        return
    for mode in ("inference", "zeroth-order (FedMeZO)", "fedkseed (zeroth-order, all parameters)", "backprop"):
        key = mode.split()[0]
        cmd = [sys.executable, __file__, "--worker", key, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append((mode, json.loads(out.strip().splitlines()[-1])))
    first = rows[0][1]
    print(f"Llama-architecture model, {first['params'] / 1e6:.1f}M parameters, LoRA r=8 on all linear "
          f"layers ({first['trainable'] / 1e6:.2f}M trainable), batch {args.batch} × {args.seq} tokens, "
          "CPU float32 (FedKSeed: every parameter trains, no LoRA)\n")
    print("| one local step | peak above the loaded model, MB | seconds |")
    print("|---|---:|---:|")
    for mode, r in rows:
        print(f"| {mode} | {r['peak_mb'] - r['base_mb']:.0f} | {r['seconds']:.2f} |")


def _run(overrides: list[str]) -> dict:
    import tempfile

    import fedtune

    with tempfile.TemporaryDirectory() as tmp:
        return fedtune.run("default", [*overrides, f"output.dir={tmp}", "output.progress=false"])


FAST = ["federation.rounds=1", "train.local_steps=2", "eval.at_start=false", "eval.every=0",
        "eval.clients=false", "eval.exact_match=false"]


def bytes_table() -> None:
    methods = [
        ("FedAvg, LoRA r=8", []),
        ("FedMeZO, LoRA r=8", ["federation.algorithm=fedmezo"]),
        ("FedKSeed, K=4096, all parameters", ["federation.algorithm=fedkseed", "adapter.method=full"]),
        ("offsite-tuning, 1+1 layers", ["federation.algorithm=offsite", "adapter.method=full"]),
    ]
    print("Bytes per client per round on the built-in benchmark (builtin:tiny, 0.82M parameters, 3.3 MB)\n")
    print("| method | up / client / round | down / client / round | once per client |")
    print("|---|---:|---:|---:|")
    for label, overrides in methods:
        s = _run([*FAST, *overrides])
        up, down = s["bytes_up"] / s["clients"], s["bytes_down"] / s["clients"]
        once = "—"
        if "offsite" in s:
            once = f"{s['offsite']['emulator_bytes'] / 1e3:,.0f} KB emulator"
            down -= s["offsite"]["emulator_bytes"]
        print(f"| {label} | {up / 1e3:,.1f} KB | {down / 1e3:,.1f} KB | {once} |")
    print()


def offsite_table(rounds: int, distill_steps: list[int]) -> None:
    rows = []
    for steps in distill_steps:
        options = f"federation.options={{distill: {{steps: {steps}, batch_size: 16}}}}"
        rows.append((steps, _run(["federation.algorithm=offsite", "adapter.method=full", options,
                                  f"federation.rounds={rounds}", "eval.every=0", "eval.clients=false"])))
    off = rows[0][1]["offsite"]
    print(f"Offsite-tuning on the built-in benchmark, {rounds} rounds × 10 local steps, layers kept "
          f"{off['emulator_layers']} of {off['full_model_layers']}, adapter = first and last layer\n")
    print("| distillation | model | test loss | exact match |")
    print("|---|---|---:|---:|")
    for steps, s in rows:
        e, o = s["offsite"]["emulator_final"], s["offsite"]
        label = f"{steps} steps" if steps else "none"
        if o["distill_loss"]:
            label += f" (loss {o['distill_loss'][0]:.2f} → {o['distill_loss'][1]:.2f})"
        print(f"| {label} | full model before tuning | {s['initial']['loss']:.3f} | "
              f"{100 * s['initial']['exact_match']:.1f} % |")
        print(f"| {label} | emulator + tuned adapter (what clients hold) | {e['loss']:.3f} | "
              f"{100 * e['exact_match']:.1f} % |")
        print(f"| {label} | full model + plugged-in adapter | {s['final']['loss']:.3f} | "
              f"{100 * s['final']['exact_match']:.1f} % |")
    print(f"\nfull model {off['full_model_bytes'] / 1e6:.2f} MB; emulator package (frozen part and "
          f"tokenizer) {off['emulator_bytes'] / 1e6:.2f} MB + adapter {rows[0][1]['adapter_bytes'] / 1e6:.2f} MB\n")


if __name__ == "__main__":
    main()
