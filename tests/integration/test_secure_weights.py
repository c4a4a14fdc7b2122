"""Secure aggregation cannot be hijacked by a weight claim: the revealed total is checked."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtune.config import load_recipe
from fedtune.privacy.secagg import SecAggClient
from fedtune.runtime.simulation import Simulation
from fedtune.track.rundir import RunDir


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_a_client_lying_about_its_weight_makes_the_round_drop(tiny_recipe, weighting, monkeypatch, caplog):
    recipe = load_recipe(tiny_recipe(
        eval__every=0, eval__at_start=False, eval__clients=False, federation__rounds=1,
        federation__weighting=weighting, federation__secure_aggregation={"enabled": True}))
    sim = Simulation(recipe)
    initial = {k: v.clone() for k, v in sim.slot.get().items()}
    honest = SecAggClient.masked_input

    def lying(self, x, weight, *, shares):  # client_0 claims 500,000 examples (or weight 500)
        claimed = weight * (500 if weighting == "uniform" else 500_000 / weight)
        return honest(self, x, claimed if self.name == "client_0" else weight, shares=shares)

    monkeypatch.setattr(SecAggClient, "masked_input", lying)
    caplog.set_level(logging.WARNING, logger="fedtune.server")
    summary = sim.run(RunDir.create(recipe.output.dir, f"liar-{weighting}"))
    final = sim.setup.view.initial()
    for name, value in initial.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)  # the round was dropped
    assert summary["missing_updates"] == 3
    expected = "not the number of survivors" if weighting == "uniform" else "above what the 3 survivors"
    assert expected in caplog.text
