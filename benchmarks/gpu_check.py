"""The GPU path, run once on a GPU machine: every check in its own process, in order of value, each
with a time limit; a report in Markdown at the end (and in --out).

Checks: the built-in benchmark in fp32, bf16 (bf16 autocast) and fp16 (fp16 weights, gradient
scaler) on the GPU; LoRA on a bf16 base against QLoRA (4-bit NF4, bitsandbytes) on a ~0.9B model
built from a config; peak memory of one local step (gradient checkpointing on and off, bf16
weights, zeroth-order, inference: benchmarks/memory.py); fedtune's local step against a plain
loop (benchmarks/local_step.py); several processes per client (torchrun over the GPUs present; with
one GPU, two ranks share it over gloo), against one process; FSDP (train.sharding: fsdp) over
NCCL and DeepSpeed ZeRO-2/3 in bf16 (train.sharding: deepspeed), each skipped with a line saying
why on fewer than 2 GPUs.

    bash benchmarks/gpu_check.sh            # on the GPU machine (sets up, then runs this)
    python benchmarks/gpu_check.py --only default-bf16,memory
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

RUN = """
import json, math, pathlib, sys, time, torch, fedtune
from safetensors.torch import load_file
overrides = json.loads(sys.argv[1])
start = time.time()
s = fedtune.run(sys.argv[2], overrides)
f = s.get("final") or {}
final = pathlib.Path(s["final_adapter"])
losses = [e["values"]["train_loss"] for e in map(json.loads, (final.parent / "metrics.jsonl").open())
          if isinstance(e.get("values"), dict) and e["values"].get("train_loss") is not None]
tensors = load_file(str(next(final.glob("*.safetensors"))))
print("RESULT " + json.dumps({"exact_match": f.get("exact_match"), "test_loss": f.get("loss"),
      "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
      "train_losses_finite": all(math.isfinite(x) for x in losses),
      "adapter_finite": all(bool(torch.isfinite(t).all()) for t in tensors.values()),
      "adapter_dtypes": sorted({str(t.dtype) for t in tensors.values()}),
      "wall_s": round(time.time() - start, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
      "adapter_parameters": s.get("adapter_parameters"), "train_s": s.get("train_seconds")}))
"""

BUILD_1B = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
from fedtune.models.hub import resolve_model_path
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny")).save_pretrained(sys.argv[1])
print("RESULT {\\"params\\": %d}" % sum(p.numel() for p in model.parameters()))
"""

SHORT = ["federation.rounds=20", "eval.every=20"]
LARGE = ["federation.rounds=1", "train.local_steps=5", "train.batch_size=8", "data.max_length=128",
         "eval.at_start=false", "eval.every=0", "eval.clients=false", "output.checkpoint_every=0",
         "data.synthetic.examples_per_category=40"]


def checks(tmp: Path, n_gpus: int) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed), most valuable first."""
    def run(name: str, overrides: list[str], recipe: str = "default") -> list[str]:
        return [PY, "-c", RUN, json.dumps([*overrides, f"output.dir={tmp / name}", "output.progress=false",
                                           "model.device=cuda"]), recipe]

    m1b = tmp / "llama-0.9b"
    out = [
        ("default-bf16", run("default-bf16", ["train.precision=bf16", *SHORT]), 150),
        ("default-fp16", run("default-fp16", ["train.precision=fp16", "model.dtype=float16", *SHORT]), 150),
        ("default-fp32", run("default-fp32", ["train.precision=fp32", "model.dtype=float32", *SHORT]), 150),
        ("build-0.9b", [PY, "-c", BUILD_1B, str(m1b)], 120),
        ("lora-0.9b-bf16", run("lora-0.9b-bf16", [f"model.name={m1b}", "model.dtype=bfloat16", *LARGE]), 150),
        ("qlora-0.9b-nf4", run("qlora-0.9b-nf4", [f"model.name={m1b}", "adapter.method=qlora", *LARGE]), 150),
        ("lora-0.9b-bf16-ckpt", run("lora-0.9b-bf16-ckpt", [f"model.name={m1b}", "model.dtype=bfloat16",
                                                            "train.gradient_checkpointing=true", *LARGE]), 150),
        ("local-step-1b-bf16", [PY, str(HERE / "local_step.py"), "--json", "--device", "cuda", "--size", "1b",
                                "--batch", "8", "--seq", "512", "--dtype", "bfloat16", "--precision", "bf16",
                                "--steps", "10"], 180),
        ("local-step-1b-bf16-mixed-packing", [PY, str(HERE / "local_step.py"), "--json", "--device", "cuda",
                                             "--size", "1b", "--batch", "8", "--seq", "512", "--dtype", "bfloat16",
                                             "--precision", "bf16", "--steps", "10", "--mixed", "--packing"], 120),
        ("local-step-small-fp32", [PY, str(HERE / "local_step.py"), "--json", "--device", "cuda", "--size",
                                   "small", "--precision", "fp32", "--steps", "20"], 120),
        ("memory", [PY, str(HERE / "memory.py"), "--json", "--device", "cuda", "--size", "1b", "--batch", "8",
                    "--seq", "1024", "--rows", "inference,lora,lora+ckpt,inference-bf16,lora-bf16,"
                    "lora-bf16+ckpt,fedmezo"], 200),
    ]
    # Several processes per client: one process against N ranks (NCCL over the GPUs present; with
    # one GPU, 2 ranks sharing it over gloo), same recipe, dropout 0, float32: same final adapter.
    ranks, env, backend = (n_gpus, "", "nccl") if n_gpus >= 2 else (2, "FEDTUNE_DIST_BACKEND=gloo ", "gloo")
    common = ("default model.device=cuda model.dtype=float32 train.precision=fp32 adapter.dropout=0 "
              "federation.rounds=3 eval.every=3 eval.clients=false output.progress=false")
    ddp = (f"{PY} -m fedtune run {common} output.dir={tmp / 'ddp-1'} > /dev/null && "
           f"{env}{PY} -m torch.distributed.run --standalone --nproc-per-node {ranks} -m fedtune run "
           f"{common} output.dir={tmp / 'ddp-n'} && {PY} -c {shlex.quote(COMPARE)} {tmp / 'ddp-1'} "
           f"{tmp / 'ddp-n'} {ranks} {backend}")
    out.append(("ddp", ["bash", "-c", ddp], 200))
    # FSDP (train.sharding: fsdp) over NCCL, against the same one-process run (needs `ddp` first).
    if n_gpus >= 2:
        fsdp = (f"test -d {tmp / 'ddp-1'} || {PY} -m fedtune run {common} output.dir={tmp / 'ddp-1'} "
                f"> /dev/null; {PY} -m torch.distributed.run --standalone --nproc-per-node {n_gpus} "
                f"-m fedtune run {common} train.sharding=fsdp output.dir={tmp / 'fsdp-n'} && "
                f"{PY} -c {shlex.quote(COMPARE)} {tmp / 'ddp-1'} {tmp / 'fsdp-n'} {n_gpus} nccl-fsdp")
        out.append(("fsdp", ["bash", "-c", fsdp], 200))
    else:
        out.append(("fsdp", _skip(f"FSDP over NCCL needs 2 GPUs; this machine has {n_gpus}"), 10))
    # DeepSpeed ZeRO (train.sharding: deepspeed) over NCCL at stages 2 and 3, with bf16 autocast
    # (float32 adapter), each against one process of the same recipe in bf16.
    if n_gpus < 2:
        out.append(("deepspeed", _skip(f"DeepSpeed ZeRO over NCCL needs 2 GPUs; this machine has {n_gpus}"), 10))
    elif importlib.util.find_spec("deepspeed") is None:
        out.append(("deepspeed", _skip("deepspeed is not installed (pip install 'fedtune[deepspeed]')"), 10))
    else:
        bf16 = common.replace("train.precision=fp32", "train.precision=bf16")
        run_n = f"{PY} -m torch.distributed.run --standalone --nproc-per-node {n_gpus} -m fedtune run {bf16}"
        ds = (f"{PY} -m fedtune run {bf16} output.dir={tmp / 'ds-1'} > /dev/null && "
              f"{run_n} train.sharding=deepspeed train.zero_stage=2 output.dir={tmp / 'ds-z2'} > /dev/null && "
              f"{run_n} train.sharding=deepspeed train.zero_stage=3 output.dir={tmp / 'ds-z3'} > /dev/null && "
              f"{PY} -c {shlex.quote(COMPARE)} {tmp / 'ds-1'} {tmp / 'ds-z2'} {n_gpus} nccl-zero2-bf16 && "
              f"{PY} -c {shlex.quote(COMPARE)} {tmp / 'ds-1'} {tmp / 'ds-z3'} {n_gpus} nccl-zero3-bf16")
        out.append(("deepspeed", ["bash", "-c", ds], 400))
    order = ["default-bf16", "default-fp16", "ddp", "fsdp", "deepspeed", "build-0.9b", "qlora-0.9b-nf4", "lora-0.9b-bf16",
             "local-step-1b-bf16", "memory", "lora-0.9b-bf16-ckpt", "local-step-1b-bf16-mixed-packing",
             "default-fp32", "local-step-small-fp32"]
    return sorted(out, key=lambda c: order.index(c[0]) if c[0] in order else len(order))


def _skip(why: str) -> list[str]:
    """A check that only says why it did not run."""
    return [PY, "-c", f"print('RESULT ' + {json.dumps(json.dumps({'skipped': why}))})"]


COMPARE = """
import json, pathlib, sys
from safetensors.torch import load_file
one, many = (next(pathlib.Path(p).glob("*/final")) for p in sys.argv[1:3])
a, b = (load_file(str(next(d.glob("*.safetensors")))) for d in (one, many))
s1, sn = (json.loads((d.parent / "summary.json").read_text()) for d in (one, many))
print("RESULT " + json.dumps({"ranks": int(sys.argv[3]), "backend": sys.argv[4],
      "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
      "max_abs_value": max(float(a[k].abs().max()) for k in a),
      "exact_match": [s1["final"].get("exact_match"), sn["final"].get("exact_match")],
      "wall_s": [s1["wall_seconds"], sn["wall_seconds"]], "bytes_up": [s1["bytes_up"], sn["bytes_up"]]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    ap.add_argument("--tmp", default="/tmp/gpu_check_work")
    args = ap.parse_args()
    out, tmp = Path(args.out), Path(args.tmp)
    out.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    import torch

    n_gpus = torch.cuda.device_count()
    only = {c for c in args.only.split(",") if c}
    report = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              f"{n_gpus} x {torch.cuda.get_device_name(0) if n_gpus else 'no GPU'}; torch {torch.__version__}"]
    for mod in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            report[-1] += f", {mod} {__import__(mod).__version__}"
        except Exception as exc:   # a missing package is reported, not fatal
            report[-1] += f", {mod} missing ({type(exc).__name__})"
    report.append("")
    print("\n".join(report), flush=True)
    for name, cmd, limit in checks(tmp, n_gpus):
        if only and name not in only:
            continue
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timed out after {limit} s"
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        seconds = time.time() - start
        with open(out / "gpu_check.log", "a") as log:
            log.write(f"\n===== {name}: {status}, {seconds:.0f} s\n$ {' '.join(cmd)[:400]}\n"
                      f"{stdout}\n{stderr[-6000:]}\n")
        results = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
        body = "\n".join(results) if results else "\n".join(stdout.strip().splitlines()[-12:])
        if status != "ok":
            body += "\n" + "\n".join(stderr.strip().splitlines()[-4:])
        section = [f"## {name}: {status} ({seconds:.0f} s)", "", "```", body.strip(), "```", ""]
        print("\n".join(section), flush=True)
        report.extend(section)
        (out / "gpu_check.md").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
