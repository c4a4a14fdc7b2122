"""`fedtune bench` end to end on the tiny model: every variant on the same split and budget, the
results table and the HTML report with its plots; nothing overwritten; errors exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from fedtune.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recipe_file(tiny_recipe, tmp_path: Path) -> Path:
    recipe = tiny_recipe(federation__clients=2, eval__at_start=False, output__checkpoint_every=0)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bench_runs_every_baseline_and_writes_the_report(tiny_recipe, tmp_path, capsys):
    path = _recipe_file(tiny_recipe, tmp_path)
    assert main(["bench", str(path), "output.name=b", "output.progress=true"]) == 0
    out = capsys.readouterr().out
    bench = tmp_path / "runs" / "b"
    variants = ["local-client_0", "local-client_1", "fedavg", "centralised"]
    for i, name in enumerate(variants, 1):
        assert (bench / name / "summary.json").is_file() and (bench / name / "final").is_dir()
        assert f"[{i}/4]" in out  # progress says which variant runs
    rows = list(csv.DictReader((bench / "results.csv").open()))
    assert [r["variant"] for r in rows] == [*variants[:2], "local-only (mean)", *variants[2:]]
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["global_loss"] and r["global_exact_match"] and r["client_0_loss"] and r["client_1_loss"]
    assert int(by["fedavg"]["bytes_up"]) > 0 and int(by["fedavg"]["bytes_down"]) > 0
    assert by["local-client_0"]["bytes_up"] == by["centralised"]["bytes_down"] == "0"
    mean = (float(by["local-client_0"]["global_loss"]) + float(by["local-client_1"]["global_loss"])) / 2
    assert abs(float(by["local-only (mean)"]["global_loss"]) - mean) < 1e-5

    # the same split: local-only runs hold one client's partition each, centralised all of them
    split = json.loads((bench / "split.json").read_text())["clients"]
    for k in (0, 1):
        own = json.loads((bench / f"local-client_{k}" / "split.json").read_text())
        assert own["clients"] == {f"client_{k}": split[f"client_{k}"]}
        assert own["global_test"] == sum(c["n_test"] for c in split.values())
    pooled = json.loads((bench / "centralised" / "split.json").read_text())["clients"]["pooled"]
    assert pooled["n_train"] == sum(c["n_train"] for c in split.values())
    # the same budget: 2 rounds; 2 local steps per client, 2 x 2 for centralised
    steps = {name: yaml.safe_load((bench / name / "recipe.yaml").read_text())["train"]["local_steps"]
             for name in variants}
    assert steps == {"local-client_0": 2, "local-client_1": 2, "fedavg": 2, "centralised": 4}
    assert json.loads((bench / "centralised" / "summary.json").read_text())["rounds"] == 2

    md = (bench / "results.md").read_text()
    assert "| fedavg | federated |" in md and "Budget: 2 rounds" in md and "local-only mean" in md
    series = json.loads((bench / "plots.json").read_text())
    assert set(series["global_loss"]) == {*variants, "local-only (mean)"}
    assert series["global_loss"]["centralised"]["x"] == [1, 2]  # eval.every=1, no round-0 eval
    assert series["train_loss"]["fedavg"]["x"] == [1, 2]
    assert set(series["bytes_up"]) == {"fedavg"}
    assert series["per_client"]["groups"] == ["client_0", "client_1", "global"]
    page = (bench / "report.html").read_text()
    for name in ("loss", "accuracy", "per_client", "bytes"):
        assert (bench / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        assert f'alt="{name}"' in page
    assert page.count("data:image/png;base64,") == 4


def test_bench_refuses_an_existing_directory_and_bad_keys(tiny_recipe, tmp_path, capsys):
    path = _recipe_file(tiny_recipe, tmp_path)
    taken = tmp_path / "runs" / "b"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    assert main(["bench", str(path), "output.name=b"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "bench directory" in err and "already exists" in err and "output.name" in err
    assert (taken / "keep.txt").read_text() == "mine" and not (taken.parent / "b-1").exists()
    assert main(["bench", str(path), "bench.algorithms=[fedsgd]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "bench.algorithms.0.name: unknown algorithm 'fedsgd'" in err
