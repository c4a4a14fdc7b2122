"""Whole simulated runs with the memory-efficient local step: fp16 and bf16 bases, packing,
gradient checkpointing (CPU; the GPU check in benchmarks/gpu_check.py runs the same on a GPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

import fedtune


def _adapter(summary) -> dict:
    return load_file(str(Path(summary["final_adapter"]) / "adapter_model.safetensors"))


def test_an_fp16_run_stays_finite_where_fp32_does_and_sends_a_float32_adapter(tiny_recipe):
    fp32 = fedtune.run(tiny_recipe(name="fp32", eval__clients=False))
    fp16 = fedtune.run(tiny_recipe(name="fp16", eval__clients=False,
                                   model__dtype="float16", train__precision="fp16"))
    for summary in (fp32, fp16):
        assert math.isfinite(summary["final"]["loss"])
        assert all(t.isfinite().all() for t in _adapter(summary).values())
    assert {str(t.dtype) for t in _adapter(fp16).values()} == {"torch.float32"}
    # Same adapter size on the wire: what travels did not change with the base's dtype.
    assert fp16["bytes_up"] == fp32["bytes_up"]
    assert fp16["final"]["loss"] == pytest.approx(fp32["final"]["loss"], rel=0.05)


def test_packing_and_checkpointing_give_the_run_of_the_plain_step(tiny_recipe):
    plain = fedtune.run(tiny_recipe(name="plain", adapter__dropout=0.0, eval__clients=False))
    lean = fedtune.run(tiny_recipe(name="lean", adapter__dropout=0.0, eval__clients=False,
                                   train__packing=True, train__gradient_checkpointing=True))
    assert lean["final"]["loss"] == pytest.approx(plain["final"]["loss"], rel=1e-4)
    a, b = _adapter(plain), _adapter(lean)
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-4, name
