"""`fedtune eval`: a saved adapter evaluated after training gives the run's own final figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtune
from fedtune.cli import main
from fedtune.errors import ModelError
from fedtune.eval.runner import evaluate_adapter


def test_eval_reproduces_the_runs_final_figures(tiny_recipe):
    summary = fedtune.run(tiny_recipe(eval__clients=False))
    result = evaluate_adapter(summary["final_adapter"], metrics=["exact_match", "rouge_l"])
    assert result["loss"] == pytest.approx(summary["final"]["loss"], abs=1e-5)
    assert result["exact_match"] == pytest.approx(summary["final"]["exact_match"])
    assert 0.0 <= result["rouge_l"] <= 1.0


def test_eval_command_on_a_data_file_and_multiple_choice(tiny_recipe, tmp_path, capsys):
    summary = fedtune.run(tiny_recipe(eval__clients=False, federation__rounds=1))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Add the two numbers.", "input": f"{i} 1",
                                        "output": str(i + 1)}) + "\n" for i in range(5)))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"}) + "\n")
    out = tmp_path / "eval.json"
    code = main(["eval", "--adapter", summary["final_adapter"], "--data", str(data), "--mc", str(mc),
                 "--metrics", "exact_match,gsm8k", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_examples"] == 5 and result["n_items"] == 1
    assert set(result) >= {"loss", "perplexity", "exact_match", "gsm8k", "mc_accuracy"}
    assert "exact_match" in capsys.readouterr().out


def test_eval_refuses_what_is_not_an_adapter(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    (tmp_path / "final").mkdir()
    with pytest.raises(ModelError, match="neither a PEFT adapter"):
        evaluate_adapter(Path(tmp_path / "final"))
    with pytest.raises(ModelError, match="no recipe.yaml"):
        evaluate_adapter(Path(tmp_path))
