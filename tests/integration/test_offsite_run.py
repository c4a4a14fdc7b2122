"""Offsite-tuning end to end: clients get the emulator (never the model), both models are evaluated,
and the saved model is the full model with the trained adapter layers plugged in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import fedtune
from fedtune.track.report import closing_table


def test_offsite_tuning_in_simulation(tiny_recipe, four_layer_dir):
    recipe = tiny_recipe(output__name="offsite", model={"name": four_layer_dir}, adapter={"method": "full"},
                         federation__algorithm="offsite",
                         federation__options={"drop_ratio": 0.5, "distill": {"steps": 5, "batch_size": 4,
                                                                              "examples": 40}},
                         eval__every=0, eval__clients=True)
    summary = fedtune.run(recipe)
    off = summary["offsite"]
    console = Console(record=True, width=200)
    console.print(closing_table(summary))
    shown = console.export_text()
    assert "plugged-in" in shown and f"{off['emulator_final']['loss']:.4f}" in shown  # both models
    assert "client_0 test │ emulator" in shown  # clients evaluate the emulator they hold
    assert off["emulator_layers"] == [0, 1, 3] and off["adapter_layers"] == {"0": 0, "2": 3}
    assert off["emulator_bytes"] < off["full_model_bytes"]
    assert off["distill_loss"] is not None and set(off["emulator_final"]) >= {"loss", "exact_match"}
    run_dir = Path(summary["final_adapter"]).parent
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    global_evals = [e["values"] for e in events if e["kind"] == "eval" and e["values"]["scope"] == "global"]
    assert all("emulator_loss" in v and "loss" in v for v in global_evals)
    # Every byte a client received: the emulator once, then the adapter layers in FIT/EVALUATE
    # messages; never the full model's weights (which would be 4 layers, not 2 + the frozen rest).
    fits = [e["values"] for e in events if e["kind"] == "fit"]
    adapter_bytes = summary["adapter_bytes"]
    assert all(adapter_bytes < f["down"] < adapter_bytes + 4096 for f in fits)
    assert summary["bytes_down"] >= 3 * off["emulator_bytes"]

    # final/ is the full model (4 layers) with the trained adapter layers at depths 0 and 3
    saved = load_file(str(run_dir / "final" / "model.safetensors"))
    ckpt = load_file(str(sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "global.safetensors"))
    for name, tensor in ckpt.items():
        full_name = name.replace("layers.2.", "layers.3.")
        assert torch.equal(saved[full_name], tensor), name
    base = load_file(str(Path(four_layer_dir) / "model.safetensors"))
    assert torch.equal(saved["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(saved["model.layers.3.mlp.up_proj.weight"], base["model.layers.3.mlp.up_proj.weight"])


def test_offsite_needs_whole_adapter_layers():
    from fedtune.config import load_recipe
    from fedtune.errors import RecipeError

    with pytest.raises(RecipeError, match="adapter.method"):
        load_recipe(None, ["federation.algorithm=offsite"])


def test_the_distilled_core_is_kept_with_the_run_and_reused_on_resume(tiny_recipe, four_layer_dir):
    from safetensors.torch import save_file

    from fedtune.algorithms.offsite_server import CORE_FILE
    from fedtune.config import load_recipe
    from fedtune.errors import RunDirError
    from fedtune.runtime.setup import Setup
    from fedtune.track.rundir import RunDir

    recipe = tiny_recipe(output__name="keep", model={"name": four_layer_dir}, adapter={"method": "full"},
                         federation__algorithm="offsite", federation__rounds=1, eval__every=0,
                         federation__options={"distill": {"steps": 3, "batch_size": 4, "examples": 20}})
    summary = fedtune.run(recipe)
    run_dir = Path(summary["final_adapter"]).parent
    saved = load_file(str(run_dir / CORE_FILE))
    assert saved and all(name.startswith("model.layers.1.") for name in saved)  # the one core layer

    # A resumed server uses the saved core, even where a new distillation would differ.
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({**saved, name: saved[name] + 1.0}, str(run_dir / CORE_FILE))
    setup = Setup(load_recipe(recipe))
    setup.keep(RunDir.open(run_dir), resume=True)
    params = dict(setup.model.named_parameters())
    assert torch.equal(params[name], saved[name] + 1.0)
    assert torch.equal(setup.party.server.package_tensors[f"model/{name}"], saved[name] + 1.0)  # what clients get
    save_file({name: saved[name]}, str(run_dir / CORE_FILE))
    with pytest.raises(RunDirError, match="does not fit"):
        setup.keep(RunDir.open(run_dir), resume=True)
