"""Benchmark models and data built from a config (no download): a Llama-architecture causal LM of
a chosen size with LoRA, fixed-length examples, and the peak-memory counters of CPU and GPU."""

from __future__ import annotations

import argparse
import time

SIZES = {   # name -> (hidden, layers, intermediate, vocab); parameters with tied embeddings
    "tiny": (128, 2, 344, 1000),          # ~0.5M: a smoke test
    "small": (256, 4, 688, 8000),         # ~5M: the CPU default of local_step.py
    "base": (768, 12, 2048, 32000),       # ~110M, ~440 MB in float32: memory.py's default
    "1b": (2048, 16, 5504, 32000),        # ~0.9B: a GPU
}


def add_model_args(ap: argparse.ArgumentParser, size: str) -> None:
    ap.add_argument("--size", choices=sorted(SIZES), default=size)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, or all-linear")


def pick_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def build(args: argparse.Namespace, *, dtype=None, lora: bool = True, seed: int = 0):
    """The model (frozen base, LoRA r=8 if `lora`) on `args.device`, in `dtype` (default float32)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, vocab = SIZES[args.size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                      num_key_value_heads=max(2, hidden // 64), max_position_embeddings=max(512, args.seq),
                      tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.device(pick_device(args.device)):
        model = LlamaForCausalLM(cfg)
    model.to(dtype or torch.float32).requires_grad_(False)
    if not lora:
        return model
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=targets))


def examples(args: argparse.Namespace, n: int, seed: int = 0, mixed: bool = False):
    """`n` examples of `args.seq` tokens (`mixed`: uniform in seq/8..seq): a BOS, a prompt (masked,
    the first half), a response (trained)."""
    import torch

    from fedtune.data.prompts import IGNORE_INDEX, TokenizedExample

    vocab = SIZES[args.size][3]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(max(2, args.seq // 8), args.seq + 1, (1,), generator=gen)) if mixed else args.seq
        ids = [1, *torch.randint(4, vocab, (length - 1,), generator=gen).tolist()]
        prompt = length // 2
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak memory above the level when entered: GPU allocator peak, else the kernel's peak RSS
    (reset through /proc/self/clear_refs, Linux)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self) -> Peak:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = status_mb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # reset the peak-RSS counter
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak = status_mb("VmHWM")
        self.above = self.peak - self.base


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)
