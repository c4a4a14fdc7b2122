"""federation.parallel_clients: K clients' local steps through one pass of the shared base, each
client's result what it would be alone (dropout 0), and a fallback where it cannot batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedtune
from fedtune.runtime import batched as batched_module


def _final(summary: dict) -> dict[str, torch.Tensor]:
    run_dir = Path(summary["final_adapter"]).parent
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / "global.safetensors"))


def _recipe(tiny_recipe, name: str, algorithm: str, options: dict, k: int, **extra):
    return tiny_recipe(
        output__name=name, adapter__dropout=0.0,
        federation={"clients": 3, "rounds": 2, "algorithm": algorithm, "options": options,
                    "parallel_clients": k},
        train={"local_steps": 2, "batch_size": 2, "lr": 0.5, "max_grad_norm": 0.5, "optimizer": "sgd",
               **extra},
        eval={"every": 0, "at_start": False, "clients": False, "max_examples": 4, "max_new_tokens": 1},
    )


@pytest.mark.parametrize(("algorithm", "options"), [
    ("fedavg", {}), ("fedprox", {"mu": 5.0}), ("scaffold", {}),
])
def test_batched_clients_end_where_sequential_clients_end(tiny_recipe, monkeypatch, algorithm, options):
    groups: list[int] = []
    real_answer = batched_module.BatchedFits.answer

    def counting(self, group):
        groups.append(len(group))
        return real_answer(self, group)

    monkeypatch.setattr(batched_module.BatchedFits, "answer", counting)
    sequential = fedtune.run(_recipe(tiny_recipe, "seq", algorithm, options, 1))
    assert groups == []
    together = fedtune.run(_recipe(tiny_recipe, "par", algorithm, options, 3))
    assert groups == [3, 3]   # each round's three clients trained as one group
    a, b = _final(sequential), _final(together)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    assert any("lora_B" in n and float(t.abs().sum()) > 0 for n, t in a.items())  # B starts at 0

    def fits(summary):  # the per-client figures are those of the sequential run
        run_dir = Path(summary["final_adapter"]).parent
        events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {(e["round"], e["client"]): e["values"] for e in events if e["kind"] == "fit"}
    fa, fb = fits(sequential), fits(together)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fb[key]["steps"] == fa[key]["steps"] == 2
        assert fb[key]["examples_seen"] == fa[key]["examples_seen"]
        assert fb[key]["train_loss"] == pytest.approx(fa[key]["train_loss"], rel=1e-5)


def test_unbatchable_local_work_runs_sequentially_and_says_so(tiny_recipe, caplog):
    recipe = _recipe(tiny_recipe, "dp", "fedavg", {}, 3)
    recipe["train"]["packing"] = True
    with caplog.at_level(logging.WARNING, logger="fedtune.batched"):
        summary = fedtune.run(recipe)
    assert summary["rounds"] == 2
    assert any("one after another" in r.getMessage() and "packing" in r.getMessage()
               for r in caplog.records)
