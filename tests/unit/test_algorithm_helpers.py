"""Small helpers of the algorithms that only whole runs reached: the summary entry and closing-table
row of a side model (offsite's emulator, FedSP's auxiliary model), a package error's first line,
a module's bytes, which local procedures may train batched, and the holdout client's procedure."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedtune.algorithms.attacks import AttackedLocal
from fedtune.algorithms.base import StandardLocal, batchable
from fedtune.algorithms.fedprox import ProxLocal
from fedtune.algorithms.offsite_emulator import state_bytes
from fedtune.algorithms.offsite_package import _first_line
from fedtune.algorithms.party import StandardParty, side_model_report, side_model_summary
from fedtune.algorithms.personal import HoldoutLocal
from fedtune.errors import FedtuneError


def test_side_model_summary_keeps_the_info_and_the_prefixed_final_metrics():
    final = {"loss": 1.5, "emulator_loss": 2.25, "emulator_exact_match": 0.5, "n_examples": 4}
    out = side_model_summary("offsite", "emulator_", {"emulator_layers": 3}, final)
    assert out == {"offsite": {"emulator_layers": 3,
                               "emulator_final": {"loss": 2.25, "exact_match": 0.5}}}
    assert side_model_summary("fedsp", "aux_", {}, None) == {"fedsp": {"aux_final": {}}}


def test_side_model_report_adds_one_row_for_the_clients_model():
    labels = {"final": "full model", "clients": "emulator"}
    summary = {"offsite": {"emulator_final": {"loss": 2.25}}, "final": {"n_examples": 4}}
    assert side_model_report(summary, "offsite", "emulator_", "emulator", labels) == {
        "labels": labels,
        "rows": [{"evaluated_on": "global test", "model": "emulator", "metrics": {"loss": 2.25},
                  "examples": 4}]}
    # no final metrics of the side model: the labels alone; no final evaluation: no example count
    assert side_model_report({"offsite": {"emulator_final": {}}}, "offsite", "emulator_", "emulator",
                             labels) == {"labels": labels, "rows": []}
    no_final = {"offsite": {"emulator_final": {"loss": 1.0}}, "final": None}
    assert side_model_report(no_final, "offsite", "emulator_", "e", labels)["rows"][0]["examples"] == ""
    assert side_model_report({"other": {}}, "offsite", "emulator_", "emulator", labels) == {}


def test_a_package_error_is_told_by_its_first_line_or_its_type():
    assert _first_line(ValueError("  bad shape\nsecond line  ")) == "bad shape"
    assert _first_line(ValueError("x" * 300)) == "x" * 200
    assert _first_line(KeyError()) == "KeyError"
    assert _first_line(ValueError("   ")) == "ValueError"


def test_state_bytes_counts_every_or_only_the_frozen_parameters():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False).half())
    module[0].bias.requires_grad_(False)
    assert state_bytes(module) == (6 + 2) * 4 + 2 * 2
    assert state_bytes(module, only_frozen=True) == 2 * 4


def test_only_procedures_that_say_so_train_batched():
    assert batchable(StandardLocal())
    assert batchable(ProxLocal(SimpleNamespace(mu=0.1)))
    assert not batchable(HoldoutLocal(StandardLocal(), 2))
    # a wrapper is not batchable because what it wraps is
    assert not batchable(AttackedLocal(StandardLocal(), "scale", 2.0))


def test_an_attacked_client_reports_the_honest_procedures_personal_model():
    class Personal:
        def personal(self, ctx):
            return {"w": ctx.state["personal/w"]}

    attacked = AttackedLocal(Personal(), "scale", 2.0)
    assert attacked.personal(SimpleNamespace(state={"personal/w": 1.5})) == {"w": 1.5}


def test_the_holdout_procedure_never_trains_and_keeps_the_inner_specs():
    class Inner:
        def server_tensor_specs(self, adapter):
            return {"c/" + k: v for k, v in adapter.items()}

    holdout = HoldoutLocal(Inner(), 0)
    assert holdout.server_tensor_specs({"w": 1}) == {"c/w": 1}
    with pytest.raises(FedtuneError, match="client 'client_7' is a holdout client"):
        holdout.fit(SimpleNamespace(client="client_7"), {})
    assert holdout.personal(SimpleNamespace()) == {}   # no adaptation steps: the global model


def test_the_standard_party_holds_nothing_and_saves_nothing():
    party = StandardParty()
    assert party.save({"w": torch.zeros(1)}, None) is False
    assert party.state_dict() == {} and party.summary({"loss": 1.0}) == {} and party.report({}) == {}
    with pytest.raises(NotImplementedError, match="^this algorithm downloads nothing before a client joins$"):
        party.client_model({}, None)
    party.load_state_dict({})
    with pytest.raises(ValueError, match="StandardParty keeps no state"):
        party.load_state_dict({"x": torch.zeros(1)})
