"""Memory per rank of a client on several processes: DDP (every rank holds the whole model) against
FSDP (`train.sharding: fsdp`, each rank one share of every weight) and DeepSpeed ZeRO-2/3
(`train.sharding: deepspeed`), on a model of a few hundred MB built from a config, with one
process as the reference.

Each mode runs in fresh processes (`torchrun --standalone`, gloo on CPU, NCCL on GPUs). Per rank
it reports what the model holds once set up (resident memory after building and sharding, less
the process before the model was built) and the peak during one local step of fedtune's
`LocalTrainer` (LoRA, AdamW; on a CPU the kernel's peak RSS, reset just before the step, on a GPU
the allocator's peak), as the largest over the ranks.

    python benchmarks/sharded_memory.py                     # CPU, 2 ranks, ~110M parameters
    python benchmarks/sharded_memory.py --ranks 4 --device cuda --size 1b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _model import Peak, add_model_args, build, examples, pick_device, status_mb  # noqa: E402

MODES = {
    "one": "one process (reference)",
    "ddp": "DDP (train.sharding: none)",
    "fsdp": "FSDP (train.sharding: fsdp)",
    "zero2": "DeepSpeed ZeRO-2 (train.sharding: deepspeed, zero_stage 2)",
    "zero3": "DeepSpeed ZeRO-3 (train.sharding: deepspeed, zero_stage 3)",
    "zero3-lean": "DeepSpeed ZeRO-3, at most 1M gathered parameters live (train.zero_options)",
}
# DeepSpeed keeps up to 1e9 gathered parameters live in a step (prefetched, kept for reuse in
# backward) by default: the whole of a model this size. The lean row lowers that limit.
LEAN = {"stage3_max_live_parameters": 10**6, "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 10**6}


def _resident(device) -> float:
    """What this rank holds now, MB: allocated GPU memory, else the process's RSS."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap (the unsharded weights) back to the kernel
    return status_mb("VmRSS")


def worker(mode: str, args: argparse.Namespace) -> dict:
    from fedtune.config import TrainSection
    from fedtune.models.zero3 import whole_numel
    from fedtune.train.distributed import data_parallel, ranks
    from fedtune.train.local import LocalTrainer
    from fedtune.train.sharded import shard_for_launch, shard_model

    launch = ranks()
    device = launch.device if launch is not None else pick_device(args.device)
    args.device = str(device)
    section = TrainSection(local_steps=1, batch_size=args.batch)
    if mode.startswith("zero"):
        import deepspeed  # noqa: F401  (its modules are not the model's memory)

        section = TrainSection(local_steps=1, batch_size=args.batch, sharding="deepspeed",
                               zero_stage=int(mode[4]), zero_options=LEAN if "lean" in mode else {})
    before = _resident(device)
    model = build(args)
    if mode == "fsdp":
        shard_model(model, launch)
    if mode.startswith("zero"):
        shard_for_launch(model, section)
    sharding = "deepspeed" if mode.startswith("zero") else mode if mode == "fsdp" else "none"
    parallel = data_parallel(sharding, model)
    trainer = LocalTrainer(model, section, 0, device, parallel=parallel)
    held = _resident(device) - before
    data = examples(args, args.batch)
    trainer.train(data, lr=1e-4, seed=0)  # a first step: lazily built state (DDP buckets, ...)
    with Peak(device) as peak:
        result = trainer.train(data, lr=1e-4, seed=1)
    whole = sum(whole_numel(p) * p.element_size() for p in model.parameters()) / 2**20
    return {"mode": mode, "rank": launch.rank if launch else 0, "held_mb": held,
            "peak_mb": peak.peak - before, "whole_mb": whole, "seconds": peak.seconds,
            "tokens": result.tokens}


def _run(mode: str, args: argparse.Namespace) -> list[dict]:
    here = Path(__file__).resolve()
    results = Path(tempfile.mkdtemp(prefix="sharded_memory-"))
    flags = ["--worker", mode, "--results", str(results), "--size", args.size, "--batch",
             str(args.batch), "--seq", str(args.seq), "--device", args.device, "--targets", args.targets]
    if mode == "one":
        cmd = [sys.executable, str(here), *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(args.ranks), str(here), *flags]
    # glibc serves large buffers freed by one layer from its heap to the next and keeps the pages:
    # RSS would then count the allocator's fragmentation, not live tensors. Buffers of 128 KiB and
    # more are mapped and unmapped on their own instead, the same for every mode.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(f.read_text()) for f in sorted(results.glob("*.json"))]
    shutil.rmtree(results, ignore_errors=True)
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return [{"mode": mode, "error": tail}]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, "base")
    ap.set_defaults(batch=4, seq=256)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--modes", default="one,ddp,fsdp", help=f"of {','.join(MODES)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # one file per rank: the ranks' lines would interleave on stdout
        row = worker(args.worker, args)
        (Path(args.results) / f"{row['mode']}-{row['rank']}.json").write_text(json.dumps(row))
        return
    device = pick_device(args.device)
    print(f"Llama-architecture model ({args.size}) with LoRA r=8 on {args.targets}, float32; batch "
          f"{args.batch} x {args.seq} tokens (the global batch, split over the ranks); {args.ranks} "
          f"ranks; {device.type}: " + ("allocated by torch" if device.type == "cuda" else "RSS")
          + ", the largest rank\n")
    print("| mode | whole model, MB | held per rank after set-up, MB | peak per rank in a step, MB "
          "| step seconds |")
    print("|---|---:|---:|---:|---:|")
    for mode in args.modes.split(","):
        rows = _run(mode, args)
        if "error" in rows[0]:
            print(f"| {MODES[mode]} | - | failed: {rows[0]['error'][:80]} | - | - |")
            continue
        held = max(r["held_mb"] for r in rows)
        peak = max(r["peak_mb"] for r in rows)
        seconds = max(r["seconds"] for r in rows)
        print(f"| {MODES[mode]} | {rows[0]['whole_mb']:.0f} | {held:.0f} | {peak:.0f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
