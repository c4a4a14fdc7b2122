"""Peak memory of one local step: LoRA plain, with gradient checkpointing, with bf16 weights, the
zeroth-order methods, and inference alone, on a model of a few hundred MB built from a config.

Each row runs in a fresh process on the same model (`--size base`: ~110M parameters, ~440 MB in
float32). The figure is the step's own peak above the loaded model: on a GPU the allocator's peak
(`torch.cuda.max_memory_allocated`), on a CPU the kernel's peak RSS, reset just before the step
(`/proc/self/clear_refs`). Backprop rows run fedtune's `LocalTrainer` (one optimizer step, AdamW);
the zeroth-order rows run fedtune's own functions: FedMeZO (two forward passes on a seeded
perturbation of the LoRA weights) and FedKSeed (the same on every weight of the model).

    python benchmarks/memory.py                      # CPU, batch 4 x 512
    python benchmarks/memory.py --device cuda --batch 8 --seq 1024
    python benchmarks/memory.py --rows lora,lora+ckpt --size small   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import Peak, add_model_args, build, examples, pick_device  # noqa: E402

# row -> (label, weights dtype, kind, gradient checkpointing)
ROWS = {
    "inference": ("inference alone (forward, no gradients)", "float32", "inference", False),
    "lora": ("LoRA step", "float32", "backprop", False),
    "lora+ckpt": ("LoRA step, gradient checkpointing", "float32", "backprop", True),
    "inference-bf16": ("inference alone, bf16 weights", "bfloat16", "inference", False),
    "lora-bf16": ("LoRA step, bf16 weights (bf16 autocast, float32 adapter)", "bfloat16", "backprop", False),
    "lora-bf16+ckpt": ("LoRA step, bf16 weights, gradient checkpointing", "bfloat16", "backprop", True),
    "fedmezo": ("FedMeZO step (zeroth-order, LoRA)", "float32", "fedmezo", False),
    "fedkseed": ("FedKSeed step (zeroth-order, every weight)", "float32", "fedkseed", False),
}


def worker(row: str, args: argparse.Namespace) -> dict:
    import torch

    from fedtune.data.prompts import collate
    from fedtune.train.zeroth_order import apply_zo_update, projected_gradient

    _, dtype_name, kind, ckpt = ROWS[row]
    device = pick_device(args.device)
    dtype = getattr(torch, dtype_name)
    model = build(args, dtype=dtype, lora=kind != "fedkseed")
    if kind == "fedkseed":
        model.requires_grad_(True)   # FedKSeed perturbs and updates every weight, no gradients
    data = examples(args, args.batch)
    batch = {k: v.to(device) for k, v in collate(data, 0).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = None
    if kind == "backprop":
        from fedtune.config import TrainSection
        from fedtune.train.local import LocalTrainer

        trainer = LocalTrainer(model, TrainSection(local_steps=1, batch_size=args.batch,
                                                   gradient_checkpointing=ckpt), 0, device)
    with Peak(device) as peak:
        if kind == "inference":
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=dtype is torch.bfloat16):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False)
        elif kind == "backprop":
            trainer.train(data, lr=1e-4, seed=0)
        else:
            model.eval()
            with torch.no_grad():
                g, _ = projected_gradient(model, params, batch, seed=1, eps=1e-3)
                apply_zo_update(params, seed=1, grad=g, lr=1e-4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"row": row, "above_mb": peak.above, "weights_mb": weights, "seconds": peak.seconds,
            "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "base")
    ap.set_defaults(batch=4, seq=512)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="also print every row as a JSON line")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    results = []
    for row in rows:
        cmd = [sys.executable, __file__, "--worker", row, "--size", args.size, "--batch", str(args.batch),
               "--seq", str(args.seq), "--device", args.device, "--targets", args.targets]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"row": row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    device = pick_device(args.device)
    first = next((r for r in results if "params" in r), None)
    if first:
        print(f"Llama-architecture model ({args.size}), {first['params'] / 1e6:.0f}M parameters, LoRA r=8 "
              f"on {args.targets}; batch {args.batch} x {args.seq} tokens; {device.type}: "
              + ("peak allocated by torch above the loaded model" if device.type == "cuda"
                 else "peak RSS above the loaded model") + "\n")
    infer = {r["row"]: r["above_mb"] for r in results if r["row"].startswith("inference") and "above_mb" in r}
    print("| one local step | weights, MB | peak above the model, MB | x inference | seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        label = ROWS[r["row"]][0]
        if "error" in r:
            print(f"| {label} | - | failed: {r['error'][:80]} | - | - |")
            continue
        ref = infer.get("inference-bf16" if "bf16" in r["row"] else "inference")
        times = f"{r['above_mb'] / ref:.1f}" if ref else "-"
        print(f"| {label} | {r['weights_mb']:.0f} | {r['above_mb']:.0f} | {times} | {r['seconds']:.2f} |")
    if args.json:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
