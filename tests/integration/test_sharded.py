"""FSDP (train.sharding: fsdp) on CPU with gloo, 2 ranks under torchrun: a sharded local step, a
sharded simulation and a sharded deployed client each give what one process gives."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _ranks import assert_close as _assert_close
from _ranks import assert_same_run, deploy_with_a_two_rank_client, grpc_transport
from _ranks import launch as _launch
from safetensors.torch import load_file

import fedtune

# A 2-layer Llama trained whole (every parameter sharded and trained) on 7 examples of different
# lengths: with batch_size 3 the micro-batches hold 3, 3 and 1 examples (a rank gets none of the
# last one and runs with weight 0).
TRAINER = textwrap.dedent("""
    import sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from fedtune.config import TrainSection
    from fedtune.data.prompts import TokenizedExample
    from fedtune.train.local import LocalTrainer

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg)

    def examples():
        out = []
        for i in range(7):
            prompt = [1] + [4 + (i + j) % 20 for j in range(3 + i % 3)]
            answer = [5 + (2 * i + j) % 20 for j in range(1 + i % 4)] + [2]
            out.append(TokenizedExample(prompt + answer, [-100] * len(prompt) + answer))
        return out

    def train(prepare=None, parallel=None, **options):
        m = model()
        if prepare is not None:
            prepare(m)
        section = TrainSection(local_steps=3, batch_size=3, grad_accum=2, optimizer="adamw",
                               max_grad_norm=1.0, lr=0.01, **options)
        trainer = LocalTrainer(m, section, pad_id=0, device=torch.device("cpu"), parallel=parallel)
        result = trainer.train(examples(), lr=0.01, seed=11)
        whole = {n: (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
                 for n, p in m.named_parameters()}
        return whole, result

    if __name__ == "__main__":
        from fedtune.train.distributed import data_parallel, ranks
        from fedtune.train.sharded import shard_model

        launch = ranks()
        shards = {}

        def prepare(m):
            shards["layers"] = shard_model(m, launch)
            p = m.model.layers[0].mlp.up_proj.weight
            shards["rows"] = (tuple(p.to_local().shape), tuple(p.shape))

        params, result = train(prepare, data_parallel("fsdp"))
        packed, _ = train(prepare, data_parallel("fsdp"), packing=True, gradient_checkpointing=True)
        torch.save({"params": params, "loss": result.loss, "tokens": result.tokens,
                    "examples": result.examples, "packed": packed, **shards},
                   f"{sys.argv[1]}/rank{launch.rank}.pt")
""")


def test_an_fsdp_step_on_two_ranks_is_the_step_of_one_process(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    _launch(tmp_path, str(script), str(out))
    namespace: dict = {"__name__": "single"}
    exec(compile(TRAINER, str(script), "exec"), namespace)
    single, result = namespace["train"]()  # one process, no launcher, nothing sharded
    start = dict(namespace["model"]().named_parameters())
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]

    # Each rank held half the rows of a [16, 8] weight: it was sharded, 2 decoder layers.
    assert [r["rows"] for r in ranks] == [((8, 8), (16, 8))] * 2
    assert [r["layers"] for r in ranks] == [2, 2]
    _assert_close(ranks[0]["params"], single, atol=1e-6)  # the same AdamW steps, gathered whole
    _assert_close(ranks[1]["params"], ranks[0]["params"], atol=0)
    moved = max((single[name] - start[name]).abs().max().item() for name in single)
    assert moved > 1e-3  # it did train
    # 3 steps of 2 micro-batches over 7 examples in batches of 3: 3+3, 1+3, 3+1 = 14 examples.
    assert result.examples == 14 and all(r["examples"] == 14 for r in ranks)
    assert all(r["tokens"] == result.tokens for r in ranks)
    assert all(r["loss"] == pytest.approx(result.loss, rel=1e-6) for r in ranks)
    packed, _ = namespace["train"](packing=True, gradient_checkpointing=True)
    _assert_close(ranks[0]["packed"], packed, atol=1e-6)


def _recipe(tiny_recipe, **overrides) -> dict:
    # No LoRA dropout (each rank draws its own masks); micro-batches of 5 split 3 + 2; SGD.
    return tiny_recipe(**{"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                          "train": {"local_steps": 2, "batch_size": 5, "grad_accum": 2, "lr": 0.05,
                                    "optimizer": "sgd", "sharding": "fsdp"},
                          **overrides})


def test_an_fsdp_simulation_on_two_ranks_writes_the_run_directory_of_one_process(tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, federation={"clients": 3, "rounds": 2, "algorithm": "fedavg"})
    single = fedtune.run({**recipe, "output": {**recipe["output"], "name": "single"}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    work = tmp_path / "work"
    work.mkdir()
    _launch(work, "-m", "fedtune", "run", str(path), "output.name=sharded")

    runs = Path(recipe["output"]["dir"])
    two = assert_same_run(runs, "sharded", single, bytes_up_within=64)  # metrics travel as text
    one = runs / "single"
    assert list(work.iterdir()) == []
    final = load_file(str(two / "final" / "adapter_model.safetensors"))
    predictions = sorted((two / "predictions").iterdir())
    assert [p.read_text() for p in predictions] == [
        (one / "predictions" / p.name).read_text() for p in predictions]  # the same answers

    # Resumed on two ranks from round 1's checkpoint: round 2 ends where it did.
    shutil.rmtree(two / "checkpoints" / "round_000002")
    shutil.rmtree(two / "final")
    (two / "summary.json").unlink()
    _launch(work, "-m", "fedtune", "run", "--resume", str(two))
    _assert_close(load_file(str(two / "final" / "adapter_model.safetensors")), final, atol=1e-6)
    assert list(work.iterdir()) == []


def test_an_fsdp_deployed_client_on_two_ranks_gives_the_adapter_of_one_process(tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, federation={"clients": 2, "rounds": 2}, transport=grpc_transport(tmp_path / "certs"))
    deployed = deploy_with_a_two_rank_client(tmp_path, recipe)

    simulated = fedtune.run({**recipe, "output": {**recipe["output"], "name": "simulated"}})
    expected = load_file(str(Path(simulated["final_adapter"]) / "adapter_model.safetensors"))
    _assert_close(deployed, expected, atol=1e-5)
