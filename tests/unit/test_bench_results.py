"""fedtune bench on synthetic results: the local-only mean, the table (markdown, CSV), the plotted
series and the HTML report; the variants planned from a recipe (same split, the budget rule);
the recipe's `bench` section."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest

from fedtune.baselines.report import make_figures, plot_series, write_report
from fedtune.baselines.results import (
    LOCAL_MEAN_NAME,
    VariantResult,
    comparison,
    local_mean,
    to_csv,
    to_markdown,
)
from fedtune.baselines.variants import POOLED, budget_rule, plan_variants
from fedtune.config import load_recipe
from fedtune.data.examples import Example
from fedtune.data.federated import ClientData, FederatedData
from fedtune.errors import RecipeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(*points):
    return [{"round": r, "loss": loss, "exact_match": em} for r, loss, em in points]


def _rounds(*points):
    return [{"round": r, "train_loss": tl, "bytes_up": up, "bytes_down": down} for r, tl, up, down in points]


def synthetic_results() -> list[VariantResult]:
    local0 = VariantResult(
        "local-client_0", "local-only", ["client_0"], {"loss": 2.0, "exact_match": 0.2},
        {"client_0": {"loss": 1.0, "exact_match": 0.6}, "client_1": {"loss": 3.0, "exact_match": 0.0}},
        wall_seconds=10.0, run_dir="/b/local-client_0",
        history={"eval": _eval((0, 5.0, 0.0), (2, 2.0, 0.2)), "rounds": _rounds((1, 3.0, 9, 9), (2, 2.5, 9, 9))},
    )
    local1 = VariantResult(
        "local-client_1", "local-only", ["client_1"], {"loss": 3.0, "exact_match": 0.4},
        {"client_0": {"loss": 4.0, "exact_match": 0.0}, "client_1": {"loss": 0.5, "exact_match": 0.8}},
        wall_seconds=20.0, run_dir="/b/local-client_1",
        history={"eval": _eval((0, 5.0, 0.0), (2, 3.0, 0.4)), "rounds": _rounds((1, 3.5, 9, 9), (2, 3.0, 9, 9))},
    )
    fed = VariantResult(
        "fedavg", "federated", ["client_0", "client_1"], {"loss": 1.5, "exact_match": 0.5},
        {"client_0": {"loss": 1.4, "exact_match": 0.5}, "client_1": {"loss": 1.6, "exact_match": 0.5}},
        bytes_up=200, bytes_down=300, wall_seconds=25.0, run_dir="/b/fedavg",
        history={"eval": _eval((0, 5.0, 0.0), (2, 1.5, 0.5)),
                 "rounds": _rounds((1, 3.2, 100, 150), (2, 2.8, 100, 150))},
    )
    central = VariantResult(
        "centralised", "centralised", ["client_0", "client_1"], {"loss": 1.0, "exact_match": 0.7},
        {"client_0": {"loss": 1.1, "exact_match": 0.6}, "client_1": {"loss": 0.9, "exact_match": 0.8}},
        wall_seconds=24.0, run_dir="/b/centralised",
        history={"eval": _eval((0, 5.0, 0.0), (2, 1.0, 0.7)), "rounds": _rounds((1, 3.0, 9, 9), (2, 2.0, 9, 9))},
    )
    results = [local0, local1]
    results.append(local_mean(results))
    return [*results, fed, central]


def test_local_mean_averages_global_and_keeps_each_clients_own_model():
    mean = synthetic_results()[2]
    assert mean.variant == LOCAL_MEAN_NAME and mean.kind == "local-only mean"
    assert mean.global_metrics == {"loss": 2.5, "exact_match": pytest.approx(0.3)}
    # client_0's own model on client_0, client_1's own model on client_1
    assert mean.per_client == {"client_0": {"loss": 1.0, "exact_match": 0.6},
                               "client_1": {"loss": 0.5, "exact_match": 0.8}}
    assert mean.history["eval"] == [{"round": 0, "loss": 5.0, "exact_match": 0.0},
                                    {"round": 2, "loss": 2.5, "exact_match": pytest.approx(0.3)}]
    assert mean.bytes_up == mean.bytes_down == 0 and mean.wall_seconds == 15.0


def test_csv_has_one_row_per_variant_with_global_and_per_client_metrics():
    rows = list(csv.DictReader(io.StringIO(to_csv(synthetic_results()))))
    assert [r["variant"] for r in rows] == ["local-client_0", "local-client_1", LOCAL_MEAN_NAME,
                                            "fedavg", "centralised"]
    fed = rows[3]
    assert fed["kind"] == "federated" and fed["trained_on"] == "client_0;client_1"
    assert float(fed["global_loss"]) == 1.5 and float(fed["global_exact_match"]) == 0.5
    assert float(fed["client_1_loss"]) == 1.6 and float(fed["client_0_exact_match"]) == 0.5
    assert fed["bytes_up"] == "200" and fed["bytes_down"] == "300" and fed["wall_seconds"] == "25.0"
    assert rows[0]["global_perplexity"] == ""  # not measured: an empty cell, not 0


def test_markdown_table_and_the_comparison_with_local_only():
    text = to_markdown(synthetic_results(), title="fedtune bench: t", budget="2 rounds")
    lines = text.splitlines()
    assert lines[0] == "# fedtune bench: t" and "Budget: 2 rounds." in text
    header = next(line for line in lines if line.startswith("| variant"))
    assert "global EM" in header and "client_0 EM" in header and "bytes up" in header
    fed = next(line for line in lines if line.startswith("| fedavg"))
    assert "| 1.5000 | 50.0 % | 50.0 % | 1.4000 | 50.0 % | 1.6000 | 200 B | 300 B | 25 |" in fed
    [line] = comparison(synthetic_results())
    assert "fedavg" in line and "local-only mean 30.0 %" in line and "+20.0 points: beats" in line
    assert "centralised reference 70.0 %" in line


def test_comparison_says_when_federated_does_not_beat_local_only():
    results = synthetic_results()
    results[3].global_metrics["exact_match"] = 0.1
    assert "does NOT beat" in comparison(results)[0]


def test_plotted_series_are_the_variants_histories():
    results = synthetic_results()
    series = plot_series(results)
    assert set(series["global_exact_match"]) == {r.variant for r in results}
    assert series["global_loss"]["fedavg"] == {"x": [0, 2], "y": [5.0, 1.5]}
    assert series["global_exact_match"][LOCAL_MEAN_NAME]["y"] == [0.0, pytest.approx(0.3)]
    assert LOCAL_MEAN_NAME not in series["train_loss"]  # no training of its own
    assert series["train_loss"]["centralised"] == {"x": [1, 2], "y": [3.0, 2.0]}
    # bytes: the federated variants only (the baselines exchange no adapter)
    assert series["bytes_up"] == {"fedavg": {"x": [1, 2], "y": [100.0, 100.0]}}
    assert series["bytes_down"] == {"fedavg": {"x": [1, 2], "y": [150.0, 150.0]}}
    per = series["per_client"]
    assert per["metric"] == "exact_match" and per["groups"] == ["client_0", "client_1", "global"]
    assert per["bars"]["local-client_0"] == [0.6, 0.0, 0.2]
    assert per["bars"]["centralised"] == [0.6, 0.8, 0.7]


def test_figures_draw_exactly_the_series():
    results = synthetic_results()
    series = plot_series(results)
    figs = make_figures(series, {r.variant: r.kind for r in results})
    assert set(figs) == {"loss", "accuracy", "per_client", "bytes"}
    test_loss_ax, train_loss_ax = figs["loss"].axes
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in test_loss_ax.get_lines()}
    assert drawn == {k: (v["x"], v["y"]) for k, v in series["global_loss"].items()}
    assert {line.get_label() for line in train_loss_ax.get_lines()} == set(series["train_loss"])
    [acc_ax] = figs["accuracy"].axes
    assert {line.get_label() for line in acc_ax.get_lines()} == set(series["global_exact_match"])
    em_ax, loss_ax = figs["per_client"].axes  # exact match, and the loss beside it
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in em_ax.containers}
    assert heights == series["per_client"]["bars"]
    heights = {c.get_label(): [p.get_height() for p in c.patches] for c in loss_ax.containers}
    assert heights["fedavg"] == [1.4, 1.6, 1.5] and heights == series["per_client"]["loss_bars"]
    # up and down on axes of their own, so equal byte counts cannot hide one line under the other
    down_ax, up_ax = figs["bytes"].axes
    [down] = down_ax.get_lines()
    [up] = up_ax.get_lines()
    assert (down.get_label(), list(down.get_ydata())) == ("fedavg down", [150.0, 150.0])
    assert (up.get_label(), list(up.get_ydata())) == ("fedavg up", [100.0, 100.0])


def test_per_client_plot_with_every_exact_match_zero_still_shows_the_losses():
    results = synthetic_results()
    for r in results:
        r.global_metrics["exact_match"] = 0.0
        for scores in r.per_client.values():
            scores["exact_match"] = 0.0
    series = plot_series(results)
    em_ax, loss_ax = make_figures(series, {r.variant: r.kind for r in results})["per_client"].axes
    assert all(p.get_height() == 0 for c in em_ax.containers for p in c.patches)
    assert "every exact match is 0" in " ".join(t.get_text() for t in em_ax.texts)
    centralised = next(c for c in loss_ax.containers if c.get_label() == "centralised")
    assert [p.get_height() for p in centralised.patches] == [1.1, 0.9, 1.0]


def test_markdown_has_each_clients_loss_beside_its_exact_match():
    text = to_markdown(synthetic_results(), title="t", budget="b")
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert "| client_0 EM | client_0 loss | client_1 EM | client_1 loss |" in header
    fed = next(line for line in text.splitlines() if line.startswith("| fedavg"))
    assert "| 50.0 % | 1.4000 | 50.0 % | 1.6000 |" in fed


def test_comparison_on_a_tied_metric_is_decided_by_the_loss():
    results = synthetic_results()
    results[2].global_metrics["exact_match"] = 0.0   # local-only mean: loss 2.5
    results[3].global_metrics["exact_match"] = 0.0   # fedavg: loss 1.5
    line = comparison(results)[0]
    assert "(+0.0 points: ties); on loss 1.5000 vs 2.5000 (-1.0000: beats local-only)" in line
    assert "does NOT" not in line
    results[3].global_metrics["loss"] = 3.0
    assert "on loss 3.0000 vs 2.5000 (+0.5000: does NOT beat local-only)" in comparison(results)[0]
    results[3].global_metrics["loss"] = 2.5
    line = comparison(results)[0]
    assert "on loss 2.5000 vs 2.5000 (+0.0000: ties)" in line and "beat" not in line


def test_report_writes_pngs_series_and_a_self_contained_html(tmp_path):
    results = synthetic_results()
    path = write_report(tmp_path, results, title="fedtune bench: t", budget="2 rounds")
    assert path == tmp_path / "report.html"
    page = path.read_text()
    for name in ("loss", "accuracy", "per_client", "bytes"):
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page  # embedded
    assert json.loads((tmp_path / "plots.json").read_text()) == json.loads(json.dumps(plot_series(results)))
    assert "<table>" in page and "local-only (mean)" in page and "Budget:</b> 2 rounds" in page
    assert 'href="fedavg/"' in page and "http" not in page  # nothing fetched from a server


def test_report_without_exact_match_plots_loss_only(tmp_path):
    results = synthetic_results()
    for r in results:
        r.global_metrics.pop("exact_match")
        for h in r.history["eval"]:
            h.pop("exact_match")
    write_report(tmp_path, results, title="t", budget="b")
    assert not (tmp_path / "accuracy.png").exists()
    assert json.loads((tmp_path / "plots.json").read_text())["per_client"]["metric"] == "loss"
    assert "global test loss 1.5000 vs local-only mean 2.5000 (-1.0000: beats" in comparison(results)[0]


# -- variants: one split, one budget -------------------------------------------------------------


def _data() -> FederatedData:
    def ex(i: int) -> Example:
        return Example(instruction=f"q{i}", output=f"a{i}", category="c")

    clients = {f"client_{k}": ClientData(f"client_{k}", train=[ex(10 * k + i) for i in range(3 + k)],
                                         val=[ex(100 + k)], test=[ex(200 + k)]) for k in range(3)}
    return FederatedData(clients=clients, test=[c.test[0] for c in clients.values()])


def test_variants_share_the_split_and_follow_the_budget_rule():
    recipe = load_recipe(None, ["federation.rounds=4", "train.local_steps=5", "federation.clients=3",
                                "federation.clients_per_round=2", "federation.compression.up.method=int8",
                                "bench.algorithms=[fedavg, {name: fedprox, options: {mu: 0.1}}]"])
    data = _data()
    variants = plan_variants(recipe, data)
    assert [v.name for v in variants] == ["local-client_0", "local-client_1", "local-client_2",
                                          "fedavg", "fedprox", "centralised"]
    for k, v in enumerate(variants[:3]):
        assert list(v.data.clients) == [f"client_{k}"]
        assert v.data.clients[f"client_{k}"] is data.clients[f"client_{k}"]  # the same partition
        assert v.data.test is data.test  # evaluated on the global test set
        fed = v.recipe.federation
        assert (fed.clients, fed.algorithm, fed.compression.up.method) == (1, "fedavg", "none")
        assert v.recipe.train.local_steps == 5 and fed.rounds == 4
    for v in variants[3:5]:
        assert v.data is data and v.recipe.federation.clients_per_round == 2
        assert v.recipe.federation.compression.up.method == "int8"
    assert variants[4].recipe.federation.options == {"mu": 0.1}
    central = variants[5]
    pooled = central.data.clients[POOLED]
    assert len(pooled.train) == 3 + 4 + 5 and pooled.test == data.test
    assert central.recipe.train.local_steps == 5 * 2  # the steps of the 2 clients of a round
    assert central.recipe.federation.rounds == 4 and central.recipe.eval.clients is False
    rule = budget_rule(recipe)
    assert rule["local"] == {"local_steps": 5} and rule["centralised"] == {"local_steps": 10}
    assert "40 in all" in rule["rule"]


def test_baselines_drop_secure_aggregation_the_federated_runs_keep_it():
    recipe = load_recipe(None, ["federation.secure_aggregation.enabled=true"])
    variants = plan_variants(recipe, _data())
    assert [v.recipe.federation.secure_aggregation.enabled for v in variants] == [
        False, False, False, True, False]


def test_budget_rule_with_local_epochs_scales_by_participation():
    recipe = load_recipe(None, ["train.local_steps=null", "train.local_epochs=2", "federation.clients=4",
                                "federation.clients_per_round=2", "bench.local_only=false"])
    rule = budget_rule(recipe)
    assert rule["centralised"] == {"local_epochs": 1.0}
    variants = plan_variants(recipe, _data())
    assert [v.kind for v in variants] == ["federated", "centralised"]
    assert variants[1].recipe.train.local_epochs == 1.0 and variants[1].recipe.train.local_steps is None


def test_default_federated_variant_is_the_recipes_algorithm():
    recipe = load_recipe(None, ["federation.algorithm=fedprox", "federation.options={mu: 0.5}",
                                "bench.centralised=false"])
    variants = plan_variants(recipe, _data())
    assert variants[-1].name == "fedprox" and variants[-1].recipe.federation.options == {"mu": 0.5}


@pytest.mark.parametrize(("override", "message"), [
    ("bench.algorithms=[fedavg, fedavg]", "more than once"),
    ("bench.algorithms=[nope]", "bench.algorithms.0.name: unknown algorithm 'nope'"),
    ("bench.algorithms=[{name: fedprox, options: {muu: 1}}]", "options.muu: unknown key"),
    ("bench.algorithms=[{name: fedavg, label: centralised}]", "reserved"),
    ("bench.algorithms=[{name: fedavg, label: a/b}]", "names a directory"),
    ("bench.algorithms=[]", "at least one"),
    ("bench.local=true", "bench.local: unknown key; allowed here: algorithms, local_only, centralised"),
])
def test_bad_bench_section_names_the_key(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert message in str(err.value) and f"command line: {override}: " in str(err.value)


def test_bench_algorithms_accept_names_and_entries():
    recipe = load_recipe(None, ["bench.algorithms=[fedavg, {name: fedprox, options: {mu: 0.1}, label: p}]"])
    assert [(a.name, a.variant, a.options) for a in recipe.bench.algorithms] == [
        ("fedavg", "fedavg", {}), ("fedprox", "p", {"mu": 0.1})]
    assert load_recipe(None).bench.algorithms is None  # the recipe's own federation.algorithm
