"""fedtune's local step against a minimal PyTorch/transformers LoRA loop: tokens per second.

Both train the same LoRA model (a Llama-architecture model built from a config), on the same
fixed-length examples, batch and sequence length, with AdamW and gradient clipping at 1.0, in the
same precision. fedtune's side is `LocalTrainer.train` (batch sampling, collation, loss over the
response tokens, the step); the plain side is the loop a user writes by hand: collate, forward
with `labels`, backward, clip, step. Runs alternate (plain, fedtune, plain, fedtune, ...), each on
a fresh copy of the same initial adapter, and the medians are compared: a ratio of 1.00 means
fedtune's step is as fast as the plain loop.

    python benchmarks/local_step.py                          # CPU: ~5M parameters, batch 8 x 256
    python benchmarks/local_step.py --size 1b --batch 8 --seq 1024 --precision bf16   # a GPU
    python benchmarks/local_step.py --gradient-checkpointing --packing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import add_model_args, build, examples, pick_device, sync  # noqa: E402


def plain_loop(model, data, args, device, autocast_dtype) -> float:
    """The hand-written loop; returns seconds for `args.steps` steps."""
    import time

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype is torch.float16 else None
    model.train()
    sync(device)
    start = time.perf_counter()
    for step in range(args.steps):
        part = data[(step * args.batch) % len(data):][:args.batch]
        width = max(len(ex.input_ids) for ex in part)   # right-padded to the longest
        ids = torch.tensor([ex.input_ids + [0] * (width - len(ex.input_ids)) for ex in part], device=device)
        labels = torch.tensor([ex.labels + [-100] * (width - len(ex.labels)) for ex in part], device=device)
        mask = torch.tensor([[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in part],
                            device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    model.eval()
    return time.perf_counter() - start


def fedtune_loop(model, data, args, device) -> float:
    import time

    from fedtune.config import TrainSection
    from fedtune.train.local import LocalTrainer

    section = TrainSection(local_steps=args.steps, batch_size=args.batch, lr=1e-4, max_grad_norm=1.0,
                           precision=args.precision, packing=args.packing,
                           gradient_checkpointing=args.gradient_checkpointing)
    trainer = LocalTrainer(model, section, pad_id=0, device=device)
    sync(device)
    start = time.perf_counter()
    trainer.train(data, lr=1e-4, seed=0)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="the base model's weights")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="on both sides (fedtune's train.gradient_checkpointing)")
    ap.add_argument("--packing", action="store_true", help="fedtune side only (gains with --mixed)")
    ap.add_argument("--mixed", action="store_true",
                    help="examples of mixed lengths (uniform in seq/8..seq) instead of all seq long")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fedtune.train.precision import resolve_precision

    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    mode = resolve_precision(args.precision, device, dtype)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    model = build(args, dtype=dtype)
    if args.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = examples(args, args.batch * args.steps, mixed=args.mixed)
    tokens = sum(sum(1 for t in ex.labels[1:] if t != -100) for ex in data)   # response tokens

    def reset() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(initial[n])

    reset()
    plain_loop(model, data[: args.batch * 2], argparse.Namespace(steps=2, batch=args.batch),
               device, autocast_dtype)   # warm-up: kernels, allocator
    times: dict[str, list[float]] = {"plain": [], "fedtune": []}
    for _ in range(args.repeats):
        reset()
        times["plain"].append(plain_loop(model, data, args, device, autocast_dtype))
        reset()
        times["fedtune"].append(fedtune_loop(model, data, args, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["plain"] / med["fedtune"]
    params = sum(p.numel() for p in model.parameters())
    row = {"device": str(device), "size": args.size, "params_m": round(params / 1e6, 1),
           "batch": args.batch, "seq": args.seq, "precision": mode, "weights": args.dtype,
           "gradient_checkpointing": args.gradient_checkpointing, "packing": args.packing,
           "mixed_lengths": args.mixed,
           "plain_tokens_per_s": round(tokens / med["plain"], 1),
           "fedtune_tokens_per_s": round(tokens / med["fedtune"], 1),
           "ratio": round(ratio, 3), "runs": {k: [round(t, 3) for t in v] for k, v in times.items()}}
    if args.json:
        print(json.dumps(row))
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}: Llama-architecture model, {params / 1e6:.1f}M parameters, LoRA r=8 on "
          f"{args.targets}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, precision "
          f"{mode} on {args.dtype} weights{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', packing' if args.packing else ''}{', mixed lengths' if args.mixed else ''}; medians of {args.repeats} alternating runs\n")
    print("| loop | response tokens / s | seconds per step |")
    print("|---|---:|---:|")
    for k in ("plain", "fedtune"):
        print(f"| {k} | {tokens / med[k]:,.0f} | {med[k] / args.steps:.4f} |")
    print(f"\nfedtune / plain throughput: {ratio:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
