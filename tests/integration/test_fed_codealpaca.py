"""The fed-codealpaca preset: CodeAlpaca's alpaca rows, clients by programming language."""

from __future__ import annotations

import json

from fedtune.cli import main
from fedtune.config import load_recipe
from fedtune.data.federated import build_federated_data

SNIPPETS = {
    "Python": ("Write a Python function that returns {i}.", "def f():\n    return {i}\n"),
    "Java": ("Write a Java method that returns {i}.", "int f() {{ return {i}; }}"),
    "Go": ("Print {i}.", 'package main\nimport "fmt"\nfunc main() {{\n\tfmt.Println({i})\n}}'),
}


def test_preset_splits_a_codealpaca_file_by_language(tmp_path, tiny_model_dir):
    rows = [{"instruction": instruction.format(i=i), "input": "", "output": output.format(i=i)}
            for instruction, output in SNIPPETS.values() for i in range(10)]
    source = tmp_path / "code_alpaca_20k.json"
    source.write_text(json.dumps(rows))
    recipe = load_recipe("fed-codealpaca", [f"data.source={source}", f"model.name={tiny_model_dir}",
                                            "federation.clients=3", "data.test_fraction=0.2"])
    assert recipe.data.format == "codealpaca" and recipe.data.split.method == "meta"
    assert recipe.eval.humaneval is not None  # HumanEval pass@1 at the end of training
    data = build_federated_data(recipe.data, recipe.federation.clients, recipe.seed)
    languages = [set(client.categories()) for client in data.clients.values()]
    assert sorted(lang for langs in languages for lang in langs) == ["Go", "Java", "Python"]
    assert all(len(langs) == 1 for langs in languages)  # one language per client
    for client in data.clients.values():
        (language,) = client.categories()
        assert all(language.lower() in ex.instruction.lower() or "fmt" in ex.output
                   for ex in client.train)


def test_missing_codealpaca_file_names_the_expected_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ here
    assert main(["recipes"]) == 0
    assert "fed-codealpaca" in capsys.readouterr().out
    assert main(["run", "fed-codealpaca", "output.dir=runs"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "not found" in err and "data/code_alpaca_20k.json" in err, err
    assert not (tmp_path / "runs").exists()  # nothing made, no model downloaded
