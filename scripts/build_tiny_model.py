"""Build fedtune's shipped tiny base model (`builtin:tiny`) from data fedtune generates itself.

A character-level tokenizer and a small Llama-architecture causal LM, pre-trained on plain
statements of the synthetic benchmark's skills (`reverse tamol = lomat`, `add 3 4 = 7`, ...). The
model learns the skills but never sees the instruction format, so federated instruction tuning
has something to teach. Reproducible: fixed seeds, deterministic CPU kernels, one thread.

    python scripts/build_tiny_model.py                # writes src/fedtune/assets/tiny
    python scripts/build_tiny_model.py --steps 200 --out /tmp/tiny   # a quick trial
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedtune.data.synthetic import TASKS, pretraining_text

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "fedtune" / "assets" / "tiny"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=512, clean_up_tokenization_spaces=False,
    )


def build_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rms_norm_eps=1e-5,
    )


def pack(tokenizer, lines: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate `<s>line\\n` chunks and cut them into rows of seq_len tokens."""
    ids: list[int] = []
    for line in lines:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer.encode(line + "\n", add_special_tokens=False))
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


@torch.no_grad()
def skill_accuracy(model, tokenizer, seed: int, per_task: int = 40) -> dict[str, float]:
    """Greedy completion of `operator input =` statements the model has not been fed in training."""
    model.eval()
    rng_lines = pretraining_text(per_task * len(TASKS) * 3, seed + 1)
    by_op: dict[str, list[str]] = {}
    for line in rng_lines:
        by_op.setdefault(line.split(" ", 1)[0], []).append(line)
    acc = {}
    for op, lines in by_op.items():
        lines = lines[:per_task]
        correct = 0
        for line in lines:
            prompt, answer = line.rsplit(" = ", 1)
            ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt + " = ", add_special_tokens=False)
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.encode("\n", add_special_tokens=False)[0],
            )
            text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).split("\n")[0].strip()
            correct += text == answer
        acc[op] = correct / len(lines)
    model.train()
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(build_config(len(tokenizer)))
    n_params = sum(p.numel() for p in model.parameters())
    # About 12 statements fit a 128-token row; make enough rows for every step without repeats.
    n_lines = args.steps * args.batch * args.seq_len // 10
    data = pack(tokenizer, pretraining_text(n_lines, args.seed), args.seq_len)
    print(f"model: {n_params / 1e6:.2f}M parameters; data: {data.shape[0]} rows of {args.seq_len} tokens")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(data.shape[0], generator=gen)
    start, losses = time.time(), []
    for step in range(args.steps):
        rows = order[(step * args.batch) % len(order):][: args.batch]
        batch = data[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step == 0:
            recent = sum(losses[-200:]) / len(losses[-200:])
            print(f"step {step + 1:5d}/{args.steps}  loss {recent:.4f}  {time.time() - start:6.0f}s", flush=True)

    acc = skill_accuracy(model, tokenizer, args.seed)
    print("skill accuracy on unseen statements:", json.dumps(acc))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # A class name every transformers version knows (newer ones write their own backend name).
    tok_config = args.out / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()),
                                      "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    info = {
        "built_by": "scripts/build_tiny_model.py",
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "parameters": n_params,
        "final_loss": sum(losses[-200:]) / len(losses[-200:]),
        "skill_accuracy": acc,
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
