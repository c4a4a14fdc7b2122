"""DeepSpeed ZeRO (train.sharding: deepspeed) on CPU with gloo, 2 ranks under torchrun: local
training at ZeRO-2 and ZeRO-3 gives what one process gives, on the first call and on the next one
(another adapter swapped in), and a simulation writes the run directory of one process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _ranks import assert_close, assert_same_run, launch

import fedtune

pytest.importorskip("deepspeed")

# A 2-layer Llama with LoRA on 7 examples of different lengths: with batch_size 3 the micro-batches
# hold 3, 3 and 1 examples (a rank gets none of the last one and runs with weight 0). AdamW with
# weight decay, and a gradient-norm bound small enough to clip every step.
TRAINER = textwrap.dedent("""
    import sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from fedtune.config import AdapterSection, TrainSection
    from fedtune.data.prompts import TokenizedExample
    from fedtune.models.adapters import AdapterSlot, attach_adapter
    from fedtune.train.local import LocalTrainer

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return attach_adapter(LlamaForCausalLM(cfg),
                              AdapterSection(method="lora", r=4, alpha=8, dropout=0.0))

    def examples():
        out = []
        for i in range(7):
            prompt = [1] + [4 + (i + j) % 20 for j in range(3 + i % 3)]
            answer = [5 + (2 * i + j) % 20 for j in range(1 + i % 4)] + [2]
            out.append(TokenizedExample(prompt + answer, [-100] * len(prompt) + answer))
        return out

    def train(stage=None):
        m = model()
        options = {} if stage is None else {"sharding": "deepspeed", "zero_stage": stage}
        section = TrainSection(local_steps=3, batch_size=3, grad_accum=2, optimizer="adamw",
                               max_grad_norm=0.05, lr=0.01, weight_decay=0.1, **options)
        parallel, out = None, {}
        if stage is not None:
            from fedtune.train.distributed import data_parallel
            from fedtune.train.sharded import shard_for_launch

            out["sharded"] = shard_for_launch(m, section)
            parallel = data_parallel("deepspeed", m)
            p = m.base_model.model.model.layers[0].mlp.up_proj.lora_A.default.weight
            out["held"] = (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel(), 4 * 8)
        slot = AdapterSlot(m)
        trainer = LocalTrainer(m, section, pad_id=0, device=torch.device("cpu"), parallel=parallel)
        out["start"] = slot.get()
        first = trainer.train(examples(), lr=0.01, seed=11)
        out["first"] = slot.get()
        # The next turn: another client's adapter swapped in, another learning rate.
        out["other"] = {n: t + 0.05 * torch.sin(torch.arange(t.numel(), dtype=t.dtype)).view_as(t)
                        for n, t in out["start"].items()}
        slot.set(out["other"])
        second = trainer.train(examples(), lr=0.02, seed=12)
        out["second"] = slot.get()
        out["results"] = [(r.loss, r.tokens, r.examples, r.steps) for r in (first, second)]
        return out

    if __name__ == "__main__":
        import fedtune
        from accelerate.state import AcceleratorState
        from fedtune.train import zero
        from fedtune.train.distributed import ranks

        # One launch for every check (a launch costs ~20 s here): first a ZeRO-3 simulation as a
        # party runs it (`fedtune run`'s function), then the trainer at each stage. A party builds
        # one engine; here accelerate's state is reset after each.
        out = {}
        for stage in ("run", 2, 3):
            if stage == "run":
                fedtune.run(sys.argv[2], ["output.name=zero"])
            else:
                out[stage] = train(stage)
            zero._ENGINES.clear()
            AcceleratorState._reset_state(reset_partial_state=False)
        torch.save(out, f"{sys.argv[1]}/rank{ranks().rank}.pt")
""")


def test_zero_on_two_ranks_gives_what_one_process_gives(tiny_recipe, tmp_path):
    # The simulation: no LoRA dropout (each rank draws its own masks); micro-batches of 5 split
    # 3 + 2; AdamW; 3 clients take turns on the one engine over 2 rounds, at ZeRO-3.
    recipe = tiny_recipe(adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                         train={"local_steps": 2, "batch_size": 5, "grad_accum": 2, "lr": 0.01,
                                "sharding": "deepspeed", "zero_stage": 3},
                         federation={"clients": 3, "rounds": 2, "algorithm": "fedavg"})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    work = tmp_path / "work"  # the ranks' working directory: nothing may appear in it
    work.mkdir()
    launch(work, str(script), str(out), str(path))
    assert list(work.iterdir()) == []

    namespace: dict = {"__name__": "single"}
    exec(compile(TRAINER, str(script), "exec"), namespace)
    single = namespace["train"]()  # one process, no launcher, plain AdamW
    launched = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    for stage in (2, 3):
        _trained_as_one_process(single, [ranks[stage] for ranks in launched], stage)
    _ran_as_one_process(recipe)


def _trained_as_one_process(single: dict, ranks: list[dict], stage: int) -> None:
    """Two local-training calls at `stage` on 2 ranks against one process."""
    # ZeRO-3 partitions even the [4, 8] LoRA factor: each rank holds 16 of its 32 elements.
    held = 16 if stage == 3 else 32
    assert [(r["sharded"], r["held"]) for r in ranks] == [(stage == 3, (held, 32))] * 2
    for r in ranks:
        assert_close(r["start"], single["start"], atol=0)
        assert_close(r["first"], single["first"], atol=1e-5)
        # The second call starts from the adapter swapped in, with a fresh AdamW: stale float32
        # partitions (the first call's result) or Adam moments would put it ~0.1 away.
        assert_close(r["second"], single["second"], atol=1e-5)
    for key, began in (("first", "start"), ("second", "other")):
        moved = max((single[key][n] - single[began][n]).abs().max().item() for n in single[began])
        assert moved > 1e-2, key  # it did train
    # 3 steps of 2 micro-batches over 7 examples in batches of 3: 3+3, 1+3, 3+1 = 14 examples.
    for r in ranks:
        for got, expected in zip(r["results"], single["results"]):
            assert got[0] == pytest.approx(expected[0], rel=1e-6)
            assert got[1:] == expected[1:] and got[2] == 14 and got[3] == 3


def _ran_as_one_process(recipe: dict) -> None:
    """The ZeRO-3 simulation on 2 ranks against the same recipe in one process."""
    single = fedtune.run({**recipe, "output": {**recipe["output"], "name": "single"}})
    # the same messages: only the text of their float metrics may differ by a digit or two
    assert_same_run(Path(recipe["output"]["dir"]), "zero", single, bytes_up_within=64)
