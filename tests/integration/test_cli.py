"""The `fedtune` command: recipes, runs on user data files, errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from fedtune.cli import main


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipes_lists_the_builtin_recipes(capsys):
    assert main(["recipes"]) == 0
    assert "default" in capsys.readouterr().out


def test_run_on_a_users_jsonl_file_with_overrides(tiny_recipe, tmp_path, capsys):
    rows = []
    for i in range(30):
        topic = ["greeting", "math", "colour"][i % 3]
        rows.append({"instruction": f"Say item {i}", "context": "" if i % 2 else "ctx",
                     "response": f"answer {i % 5}", "category": topic})
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe()
    recipe["data"] = {"source": str(data), "template": "alpaca", "max_length": 256,
                      "test_fraction": 0.2, "val_fraction": 0.1, "split": {"method": "meta"}}
    path = _write_recipe(tmp_path / "mine.yaml", recipe)

    code = main(["run", str(path), "federation.rounds=1", "output.name=cli-run"])
    assert code == 0
    run_dir = Path(recipe["output"]["dir"]) / "cli-run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1
    split = json.loads((run_dir / "split.json").read_text())
    cats = [set(c["categories"]) for c in split["clients"].values()]
    assert all(len(c) == 1 for c in cats) and set.union(*cats) == {"greeting", "math", "colour"}
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["federation"]["rounds"] == 1 and saved["data"]["format"] == "auto"


def test_bad_recipe_exits_2_naming_file_line_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("federation:\n  clients: 2\n  clients_per_round: 5\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "clients_per_round" in err


def test_malformed_data_row_exits_2_naming_file_and_line(tiny_recipe, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    recipe = tiny_recipe()
    recipe["data"] = {"source": str(data)}
    assert main(["run", str(_write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "broken.jsonl:2" in capsys.readouterr().err.replace("\n", "")
    assert not (Path(recipe["output"]["dir"])).exists()  # nothing made for a run that cannot start


def test_two_recipes_or_a_finished_resume_are_refused(tiny_recipe, tmp_path, capsys):
    assert main(["run", "default", "default"]) == 2
    path = _write_recipe(tmp_path / "r.yaml", tiny_recipe(output__name="done"))
    assert main(["run", str(path), "federation.rounds=1"]) == 0
    run_dir = Path(tiny_recipe()["output"]["dir"]) / "done"
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "finished already" in capsys.readouterr().err


def test_missing_local_model_directory_is_a_clear_error(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(model__name=str(tmp_path / "no-model-here"))
    assert main(["run", str(_write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "model.name" in capsys.readouterr().err


def test_console_entry_point():
    out = subprocess.run([sys.executable, "-m", "fedtune", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fedtune ")


def test_dataset_presets_name_the_files_they_need(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "fed-dolly" in listed and "fed-gsm8k-3" in listed
    for preset, expected in [("fed-dolly", "data/databricks-dolly-15k.jsonl"),
                             ("fed-gsm8k-3", "data/gsm8k/train.jsonl")]:
        assert main(["run", preset, "output.dir=runs"]) == 2
        err = capsys.readouterr().err.replace("\n", "")
        assert "not found" in err and expected in err, err
    assert not (tmp_path / "runs").exists()  # nothing made, no model downloaded
