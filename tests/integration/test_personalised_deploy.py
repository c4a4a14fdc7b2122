"""Ditto deployed over TLS on loopback: every `fedtune client` process keeps its personal adapter
in its own directory, equal to the simulation's checkpointed client state, and the clients'
personal figures equal the simulation's; the personal tensors never travel (update size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_grpc_deploy import CLIENTS, _deploy, _free_port, _simulate, _write_recipe


@pytest.mark.slow   # about 3 minutes on 2 shared cores: four processes and a simulation
def test_ditto_deployed_keeps_each_personal_adapter_on_the_clients_disk(tiny_recipe, tmp_path):
    port = _free_port()
    path, recipe = _write_recipe(tiny_recipe, tmp_path, port, federation__algorithm="ditto",
                                 federation__options={"lam": 0.5}, federation__rounds=2,
                                 train__local_steps=2, eval__every=0, eval__clients=True,
                                 eval__exact_match=False)
    _deploy(tmp_path, path, port)
    out = Path(recipe["output"]["dir"])
    summary = json.loads((out / "deployed" / "summary.json").read_text())
    simulated, _ = _simulate(recipe)
    assert summary["per_client"] == simulated["per_client"]           # personal_* included
    assert all("personal_loss" in m for m in summary["per_client"].values())
    last = sorted((out / "simulated" / "checkpoints").glob("round_*"))[-1]
    expected = load_file(str(last / "clients.safetensors"))
    for name in CLIENTS:
        kept = load_file(str(out / name / "state.safetensors"))
        assert kept and all(k.startswith("personal/") for k in kept)
        assert kept.keys() == {k.split("/", 1)[1] for k in expected if k.startswith(name + "/")}
        for k, v in kept.items():
            torch.testing.assert_close(v, expected[f"{name}/{k}"], rtol=0, atol=1e-6)
    events = [json.loads(line) for line in (out / "deployed" / "metrics.jsonl").read_text().splitlines()]
    ups = {e["values"]["up"] for e in events if e["kind"] == "fit"}
    adapter = summary["adapter_bytes"]
    assert all(adapter < up < adapter + 8192 for up in ups)   # one adapter's delta, not two
