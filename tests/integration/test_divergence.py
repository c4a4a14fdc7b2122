"""A client whose local training diverges (NaN/inf) is told to the server as an ERROR reply,
rejected and counted; its state is left as before that round; the run goes on with the others."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fedtune
from fedtune.config import load_recipe
from fedtune.errors import RecipeError
from fedtune.runtime.simulation import Simulation
from fedtune.track.rundir import RunDir


class PoisonedLocal:
    """Wraps a client's procedure: trains as usual, then one adapter tensor becomes NaN."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fit(self, ctx, adapter):
        self.calls += 1
        outcome = self.inner.fit(ctx, adapter)
        ctx.state["probe"] = torch.full((2,), float(self.calls))  # a state change to be undone
        name = next(iter(outcome.update))
        outcome.update[name] = torch.full_like(outcome.update[name], float("nan"))
        return outcome


def test_every_client_diverging_leaves_the_adapter_unchanged(tiny_recipe):
    """AdamW at lr 90: every client's loss goes NaN in round 1. The run
    finishes, each of the 3 x 2 fit replies is an ERROR counted by the server, and the final
    adapter is the initial one, bit for bit (nothing non-finite was ever aggregated)."""
    recipe = tiny_recipe(train__lr=90.0, train__local_steps=6, eval__every=0)
    out = fedtune.run(recipe)
    assert out["rejected_replies"] == 6
    assert out["missing_updates"] == 6
    final = load_file(f"{out['final_adapter']}/adapter_model.safetensors")
    sim = Simulation(load_recipe(recipe))
    initial = sim.setup.view.initial()
    assert len(final) == len(initial) > 0
    for name, tensor in initial.items():
        assert torch.equal(final[name.replace(".default", "")], tensor), name  # peft saves without it


def test_one_diverging_client_is_rejected_and_keeps_its_state(tiny_recipe, tmp_path):
    """SCAFFOLD, 3 clients, 2 rounds; client_1's update is NaN every round. The server counts 2
    rejected replies and aggregates the other two; client_1's control variate state stays empty
    (as before its first round) and the 'probe' its procedure wrote is undone; the others have
    their control variates."""
    recipe = load_recipe(tiny_recipe(federation__algorithm="scaffold", eval__every=0))
    sim = Simulation(recipe)
    poisoned = PoisonedLocal(sim.clients["client_1"].local)
    sim.clients["client_1"].local = poisoned
    run_dir = RunDir.create(str(tmp_path / "runs"), "div")
    run_dir.write_recipe(recipe.to_yaml())
    out = sim.run(run_dir)
    assert poisoned.calls == 2
    assert out["rejected_replies"] == 2 and out["missing_updates"] == 2
    assert sim.clients["client_1"].state == {}
    for name in ("client_0", "client_2"):
        state = sim.clients[name].state
        assert state and all(torch.isfinite(t).all() for t in state.values())
    final = load_file(f"{out['final_adapter']}/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_a_learning_rate_clients_would_refuse_is_a_recipe_error(tiny_recipe):
    with pytest.raises(RecipeError, match="lr"):
        load_recipe(tiny_recipe(train__lr=1e4))
