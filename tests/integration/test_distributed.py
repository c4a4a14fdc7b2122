"""Several processes per party on CPU (gloo, 2 ranks under torchrun): local training, a simulated
run and a deployed client each give what one process gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from _ranks import WAIT, assert_same_run, deploy_with_a_two_rank_client, grpc_transport
from _ranks import assert_close as _assert_close
from _ranks import env as _env
from _ranks import launch as _launch
from _ranks import torchrun as _torchrun
from safetensors.torch import load_file

import fedtune

# Built the same way in this process and in the launched ranks: a 1-layer Llama and 7 examples of
# different lengths, so that with batch_size 3 the micro-batches have 3, 3 and 1 examples (a rank
# gets no example of the last one).
TRAINER = textwrap.dedent("""
    import sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from fedtune.config import TrainSection
    from fedtune.data.prompts import TokenizedExample
    from fedtune.train.local import LocalTrainer

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg)

    def examples():
        out = []
        for i in range(7):
            prompt = [1] + [4 + (i + j) % 20 for j in range(3 + i % 3)]
            answer = [5 + (2 * i + j) % 20 for j in range(1 + i % 4)] + [2]
            out.append(TokenizedExample(prompt + answer, [-100] * len(prompt) + answer))
        return out

    def train(parallel=None, **options):
        m = model()
        section = TrainSection(local_steps=3, batch_size=3, grad_accum=2, optimizer="adamw",
                               max_grad_norm=1.0, lr=0.01, **options)
        trainer = LocalTrainer(m, section, pad_id=0, device=torch.device("cpu"), parallel=parallel)
        result = trainer.train(examples(), lr=0.01, seed=11)
        return {n: p.detach().clone() for n, p in m.named_parameters()}, result

    if __name__ == "__main__":
        from fedtune.train.distributed import data_parallel, ranks
        params, result = train(data_parallel())
        packed, _ = train(data_parallel(), packing=True, gradient_checkpointing=True)
        rank = ranks().rank
        torch.save({"params": params, "loss": result.loss, "tokens": result.tokens,
                    "examples": result.examples, "world": ranks().world_size, "packed": packed},
                   f"{sys.argv[1]}/rank{rank}.pt")
""")


def test_two_ranks_take_the_step_one_process_takes_on_the_same_batch(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    _launch(tmp_path, str(script), str(out))
    namespace: dict = {"__name__": "single"}
    exec(compile(TRAINER, str(script), "exec"), namespace)
    single, result = namespace["train"]()  # one process, no launcher
    start = dict(namespace["model"]().named_parameters())
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]

    assert [r["world"] for r in ranks] == [2, 2]
    _assert_close(ranks[0]["params"], single, atol=1e-6)  # DDP: the same AdamW steps
    for name, value in ranks[1]["params"].items():  # the ranks stay bit-identical
        assert torch.equal(value, ranks[0]["params"][name]), name
    moved = max((single[name] - start[name]).abs().max().item() for name in single)
    assert moved > 1e-3  # it did train
    # 3 steps of 2 micro-batches over 7 examples in batches of 3: 3+3, 1+3, 3+1 = 14 examples.
    assert result.examples == 14 and all(r["examples"] == 14 for r in ranks)
    assert all(r["tokens"] == result.tokens for r in ranks)
    assert all(r["loss"] == pytest.approx(result.loss, rel=1e-6) for r in ranks)
    # With packing (each rank packs its own share) and gradient checkpointing: the same again.
    packed, _ = namespace["train"](packing=True, gradient_checkpointing=True)
    _assert_close(ranks[0]["packed"], packed, atol=1e-6)
    _assert_close(ranks[1]["packed"], ranks[0]["packed"], atol=0)


def _recipe(tiny_recipe, tmp_path: Path, **overrides) -> dict:
    # No LoRA dropout: with it, each rank draws its own masks and the update equals one
    # process's in distribution only. Micro-batches of 5 examples: 3 on rank 0, 2 on rank 1.
    # SGD: AdamW's normalisation (and SCAFFOLD's 1/(steps*lr)) magnify the float rounding of a
    # different summation order (~1e-7) on near-zero gradients to ~1e-5 over two rounds.
    return tiny_recipe(**{"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                          "train": {"local_steps": 2, "batch_size": 5, "grad_accum": 2, "lr": 0.05,
                                    "optimizer": "sgd"},
                          **overrides})


def test_a_simulation_on_two_ranks_writes_the_run_directory_of_one_process(tiny_recipe, tmp_path):
    # SCAFFOLD: clients keep state across rounds (their control variates), which the resume
    # below must restore on every rank.
    recipe = _recipe(tiny_recipe, tmp_path, federation={"clients": 3, "rounds": 2, "algorithm": "scaffold"})
    single = fedtune.run({**recipe, "output": {**recipe["output"], "name": "single"}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    work = tmp_path / "work"  # the ranks' working directory: nothing may appear in it
    work.mkdir()
    _launch(work, "-m", "fedtune", "run", str(path), "output.name=ranks")

    runs = Path(recipe["output"]["dir"])
    two = assert_same_run(runs, "ranks", single, atol=1e-6)   # one run, written by rank 0
    assert list(work.iterdir()) == []
    final = load_file(str(two / "final" / "adapter_model.safetensors"))
    fits = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "fit" for e in fits) == 2 * 3

    # Resume on two ranks from round 1: SCAFFOLD's client control variates come back on both
    # ranks (a rank without them would train differently), so round 2 ends where it did.
    shutil.rmtree(two / "checkpoints" / "round_000002")
    shutil.rmtree(two / "final")
    (two / "summary.json").unlink()
    _launch(work, "-m", "fedtune", "run", "--resume", str(two))
    resumed = load_file(str(two / "final" / "adapter_model.safetensors"))
    _assert_close(resumed, final, atol=1e-6)
    assert list(work.iterdir()) == []


def test_a_deployed_client_on_two_ranks_gives_the_adapter_of_one_process(tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, tmp_path, federation={"clients": 2, "rounds": 2},
                     transport=grpc_transport(tmp_path / "certs"))
    deployed = deploy_with_a_two_rank_client(tmp_path, recipe)

    simulated = fedtune.run({**recipe, "output": {**recipe["output"], "name": "simulated"}})
    expected = load_file(str(Path(simulated["final_adapter"]) / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in expected.items() if "lora_B" in k) > 1e-3  # trained
    _assert_close(deployed, expected, atol=1e-6)


def test_an_error_on_rank_0_ends_every_rank_with_its_message_once(tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, tmp_path)
    taken = Path(recipe["output"]["dir"]) / "taken"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(_torchrun("-m", "fedtune", "run", str(path), "output.name=taken"),
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert text.count(f"run directory {taken} already exists and is not empty") == 1
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
