"""pFL-Bench's client summary by hand: weighted mean, std, bottom decile (worst first), the
unseen group and participation gap, and the bench's pFL table rows."""

from __future__ import annotations

import math

import pytest

from fedtune.baselines.pfl_table import pfl_rows
from fedtune.baselines.results import VariantResult
from fedtune.track.pfl import pfl_summary, spread


def test_spread_by_hand():
    # 11 clients: accuracies 0.0, 0.1, ..., 1.0 with weights 1..11
    values = [(i / 10, i + 1) for i in range(11)]
    s = spread(values, "exact_match")
    assert s["mean"] == pytest.approx(sum(i / 10 * (i + 1) for i in range(11)) / 66)
    mean = 0.5
    assert s["std"] == pytest.approx(math.sqrt(sum((i / 10 - mean) ** 2 for i in range(11)) / 11))
    assert s["bottom_10"] == pytest.approx(0.1)   # sorted ascending, index 11 // 10 = 1
    losses = spread([(float(i), 1) for i in range(11)], "loss")
    assert losses["bottom_10"] == 9.0             # worst first is highest: index 1 of 10..0
    assert losses["clients"] == 11


def test_pfl_summary_groups_and_gap():
    per_client = {
        "client_0": {"loss": 2.0, "personal_loss": 1.0, "exact_match": 0.5, "n_examples": 10},
        "client_1": {"loss": 4.0, "personal_loss": 3.0, "exact_match": 0.0, "n_examples": 30},
        "client_2": {"loss": 5.0, "personal_loss": 2.5, "n_examples": 5},
        "client_3": None,   # did not answer
    }
    out = pfl_summary(per_client, ["client_2"])
    seen = out["participating"]
    assert seen["global"]["loss"]["mean"] == pytest.approx((2 * 10 + 4 * 30) / 40)
    assert seen["personal"]["loss"]["mean"] == pytest.approx((1 * 10 + 3 * 30) / 40)
    assert seen["personal"]["loss"]["std"] == pytest.approx(1.0)
    assert seen["global"]["exact_match"]["bottom_10"] == 0.0
    assert "exact_match" not in seen["personal"]
    assert out["unseen"]["personal"]["loss"]["mean"] == 2.5
    assert out["gap"]["personal"]["loss"] == pytest.approx(2.5 - 2.5)
    assert out["gap"]["global"]["loss"] == pytest.approx(5.0 - 3.5)
    assert pfl_summary({}, []) is None


def test_bench_rows_use_the_global_model_where_there_is_no_personal_one():
    pfl = pfl_summary({"client_0": {"loss": 2.0, "exact_match": 0.25, "n_examples": 4},
                       "client_1": {"loss": 1.0, "exact_match": 0.75, "n_examples": 4}}, [])
    plain = VariantResult("fedavg", "federated", ["client_0", "client_1"], {}, {}, bytes_up=300,
                          bytes_down=700, pfl=pfl)
    local = VariantResult("local-only (mean)", "local-only mean", [], {},
                          {"client_0": {"loss": 0.5, "n_examples": 1}, "client_1": {"loss": 1.5, "n_examples": 3}})
    local.per_client["client_9"] = {"loss": 100.0, "n_examples": 50}   # a holdout client: left out
    rows = {r["variant"]: r for r in pfl_rows([local, plain], rounds=10, holdout=["client_9"])}
    assert rows["fedavg"]["personal_exact_match_mean"] == pytest.approx(0.5)
    assert rows["fedavg"]["global_loss"] == pytest.approx(1.5)
    assert rows["fedavg"]["bytes_per_round"] == 100.0
    assert rows["fedavg"]["unseen_loss"] is None
    assert rows["local-only (mean)"]["personal_loss_mean"] == pytest.approx((0.5 + 4.5) / 4)
    assert rows["local-only (mean)"]["global_loss"] is None


def test_results_csv_carries_the_pfl_columns_by_variant():
    import csv
    import io

    from fedtune.baselines.results import to_csv

    pfl = pfl_summary({"client_0": {"loss": 2.0, "exact_match": 0.25, "n_examples": 4},
                       "client_1": {"loss": 1.0, "exact_match": 0.75, "n_examples": 12}}, [])
    plain = VariantResult("fedavg", "federated", ["client_0", "client_1"], {"loss": 1.0}, {}, bytes_up=300,
                          bytes_down=700, pfl=pfl)
    other = VariantResult("centralised", "centralised", [], {"loss": 0.5}, {})
    results = [plain, other]
    rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(to_csv(results, pfl_rows(results, rounds=10))))}
    fed = rows["fedavg"]
    assert float(fed["pfl_global_exact_match"]) == pytest.approx((4 * 0.25 + 12 * 0.75) / 16)
    assert float(fed["pfl_personal_loss_mean"]) == pytest.approx((4 * 2.0 + 12 * 1.0) / 16)
    assert float(fed["pfl_bytes_per_round"]) == 100.0
    assert fed["pfl_unseen_loss"] == ""
    assert rows["centralised"]["pfl_personal_loss_mean"] == ""    # no client figures: empty cells
    assert float(rows["centralised"]["global_loss"]) == 0.5
