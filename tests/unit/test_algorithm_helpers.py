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


def test_build_party_gives_the_party_the_checked_options_and_the_recipe():
    from fedtune.algorithms import build_party
    from fedtune.errors import RecipeError

    recipe = SimpleNamespace(seed=3)
    party = build_party("fedsp", {"shared_blocks": 2}, recipe)
    assert party.recipe is recipe
    assert party.options.shared_blocks == 2        # the options given, checked into FedSPConfig
    with pytest.raises(RecipeError, match=r"federation\.options\.shared_blocks: .*\(options of fedsp: "):
        build_party("fedsp", {"shared_blocks": 0}, recipe)


def test_dp_fedavg_noise_is_the_seeded_draw_added_to_the_clipped_mean():
    from fedtune.algorithms.dp_fedavg import dp_fedavg_aggregate

    g = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    ups = [{"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])},     # norm 5: clipped to 1
           {"w": torch.tensor([0.0, 0.5]), "b": torch.tensor([0.0])}]     # norm 0.5: kept
    torch.manual_seed(123)   # the global stream must not be what is drawn
    out = dp_fedavg_aggregate(g, ups, clip_norm=1.0, noise_multiplier=2.0,
                              generator=torch.Generator().manual_seed(7))
    draw = torch.Generator().manual_seed(7)
    std = 2.0 * 1.0 / 2
    noise_w = torch.randn(2, generator=draw) * std    # drawn tensor by tensor, in the state's order
    noise_b = torch.randn(1, generator=draw) * std
    torch.testing.assert_close(out["w"], torch.tensor([1.0 + (0.6 + 0.0) / 2, 1.0 + (0.8 + 0.5) / 2]) + noise_w)
    torch.testing.assert_close(out["b"], noise_b)


def test_flora_aggregate_keeps_the_global_dtypes_and_counts_every_modules_factors():
    from fedtune.algorithms.flora import flora_aggregate

    bf = torch.bfloat16
    g = {"p.lora_A.default": torch.ones(1, 2, dtype=bf), "p.lora_B.default": torch.zeros(2, 1, dtype=bf),
         "q.lora_A.default": torch.ones(1, 3, dtype=bf), "q.lora_B.default": torch.zeros(1, 1, dtype=bf),
         "down/flora/p": torch.zeros(2, 2, dtype=bf), "down/flora/q": torch.zeros(1, 3, dtype=bf),
         "norm": torch.tensor([1.0], dtype=bf)}
    local = {**g, "p.lora_B.default": torch.ones(2, 1, dtype=bf), "norm": torch.tensor([3.0], dtype=bf)}
    out, info = flora_aggregate(g, [local, local], [1.0, 3.0])
    assert {k: v.dtype for k, v in out.items()} == {k: bf for k in g}
    torch.testing.assert_close(out["down/flora/p"].float(), torch.ones(2, 2))   # B·A, weights 1/4 + 3/4
    torch.testing.assert_close(out["norm"].float(), torch.tensor([3.0]))
    # stacked: p's A (2x2) and B (2x2), q's A (2x3) and B (1x2), 2 bytes each in bfloat16
    assert info == {"flora_stacked_rank": 2, "flora_stacked_bytes": (4 + 4 + 6 + 2) * 2}


def test_flora_weighs_by_examples_or_uniformly_as_the_options_say():
    from fedtune.algorithms import build_strategy
    from fedtune.algorithms.base import ClientUpdate

    g = {"p.lora_A.default": torch.ones(1, 1), "p.lora_B.default": torch.zeros(1, 1),
         "down/flora/p": torch.zeros(1, 1)}
    ups = [ClientUpdate("a", {"p.lora_A.default": torch.zeros(1, 1), "p.lora_B.default": torch.ones(1, 1)}, 3),
           ClientUpdate("b", {"p.lora_A.default": torch.zeros(1, 1), "p.lora_B.default": torch.zeros(1, 1)}, 1)]
    by_examples = build_strategy("flora", {"weighting": "examples"}, 2).aggregate_fit(1, g, ups)
    uniform = build_strategy("flora", {"weighting": "uniform"}, 2).aggregate_fit(1, g, ups)
    assert by_examples["down/flora/p"].item() == pytest.approx(0.75)   # client a's B·A = 1, weight 3/4
    assert uniform["down/flora/p"].item() == pytest.approx(0.5)


def test_flora_party_marks_its_delta_file_as_pytorch_tensors(tmp_path):
    from safetensors import safe_open

    from fedtune.algorithms.flora import DELTA_FILE, FLoRAParty

    party = FLoRAParty(SimpleNamespace(adapter=SimpleNamespace(alpha=8, r=8)))
    party.save({"down/flora/lm_head": torch.ones(1, 1)}, tmp_path)
    with safe_open(str(tmp_path / DELTA_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}   # what transformers' loaders expect of a .safetensors


def test_a_dp_fedavg_round_without_any_update_is_refused_in_words():
    from fedtune.algorithms import build_strategy

    fold = build_strategy("dp_fedavg", {"noise_seed": 1}, 4).fold(1, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"^dp_fedavg_aggregate needs at least one update$"):
        fold.finish()
