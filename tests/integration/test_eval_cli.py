"""`fedtune eval`: a saved adapter evaluated after training gives the run's own final figures."""

from __future__ import annotations

import json
import math
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


def _hand_figures(model, tok, prompts: list[str], outputs: list[str], steps: int):
    """Greedy answers and the mean response-token loss, computed directly on the model."""
    import torch
    import torch.nn.functional as F

    answers, total, tokens = [], 0.0, 0
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
            out: list[int] = []
            for _ in range(steps):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
            answers.append(tok.decode(out, skip_special_tokens=True).strip())
            response = tok.encode(output, add_special_tokens=False) + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([ids + response])).logits[0, len(ids) - 1:-1]
            total += float(F.cross_entropy(logits, torch.tensor(response), reduction="sum"))
            tokens += len(response)
    return answers, total / tokens


def test_eval_command_on_a_data_file_and_multiple_choice(tiny_recipe, tiny_model_dir, tmp_path, capsys):
    """The figures of `fedtune eval --data` equal those computed by hand on the saved adapter:
    two of five answers are set to what the model says, so exact match is 2/5."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.data.examples import Example
    from fedtune.data.prompts import render_prompt

    summary = fedtune.run(tiny_recipe(eval__clients=False, federation__rounds=1))
    adapter = summary["final_adapter"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    rows = [{"instruction": "Add the two numbers.", "input": f"{i} 1"} for i in range(5)]
    prompts = [render_prompt(Example(r["instruction"], "", r["input"]), "compact") for r in rows]
    said, _ = _hand_figures(model, tok, prompts, ["x"] * 5, 3)
    assert all(said)
    outputs = [said[0], said[1], said[2] + "q", "9 9", str(7)]
    _, loss = _hand_figures(model, tok, prompts, outputs, 3)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({**r, "output": o}) + "\n" for r, o in zip(rows, outputs)))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"}) + "\n")
    out = tmp_path / "eval.json"
    code = main(["eval", "--adapter", adapter, "--data", str(data), "--mc", str(mc),
                 "--metrics", "exact_match,gsm8k", "--output", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_examples"] == 5 and result["n_items"] == 1
    assert result["exact_match"] == pytest.approx(2 / 5)
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["mc_accuracy"] in (0.0, 1.0)
    assert "exact_match" in capsys.readouterr().out


def test_eval_refuses_what_is_not_an_adapter(tmp_path):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    (tmp_path / "final").mkdir()
    with pytest.raises(ModelError, match="neither a PEFT adapter"):
        evaluate_adapter(Path(tmp_path / "final"))
    with pytest.raises(ModelError, match="no recipe.yaml"):
        evaluate_adapter(Path(tmp_path))


TOY_PROBLEMS = [
    {"task_id": "Toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "Toy/1", "prompt": "def neg(x):\n", "entry_point": "neg",
     "test": "def check(f):\n    assert f(4) == -4\n"},
]


def test_humaneval_at_the_end_of_training_and_through_the_eval_command(tiny_recipe, tmp_path, capsys):
    problems = tmp_path / "toy.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in TOY_PROBLEMS))
    options = {"samples": 1, "max_new_tokens": 6, "problems": str(problems), "timeout": 3.0}
    summary = fedtune.run(tiny_recipe(eval__clients=False, federation__rounds=1,
                                      eval__humaneval=options))
    run_dir = Path(summary["final_adapter"]).parent
    trained = [json.loads(line) for line in (run_dir / "humaneval.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in trained] == ["Toy/0", "Toy/1"]
    assert summary["humaneval"]["humaneval_pass@1"] == sum(r["passed"] for r in trained) / 2
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e["values"].get("scope") == "humaneval" for e in events)

    # the same adapter through `fedtune eval`: 3 sampled completions per problem, pass@1 and pass@2
    out = tmp_path / "eval.json"
    argv = ["eval", "--adapter", summary["final_adapter"], "--humaneval", "--samples", "3",
            "--k", "1,2", "--temperature", "1.0", "--max-new-tokens", "6",
            "--problems", str(problems), "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert "loss" not in result  # --humaneval alone skips the test set
    rows = [json.loads(line) for line in (tmp_path / "eval.humaneval.jsonl").read_text().splitlines()]
    assert result["humaneval_samples_file"] == str(tmp_path / "eval.humaneval.jsonl")
    assert len(rows) == 6 and {(r["task_id"], r["sample"]) for r in rows} == {
        (t, i) for t in ("Toy/0", "Toy/1") for i in range(3)}
    assert all(set(r) == {"task_id", "sample", "completion", "passed", "error", "reason"} for r in rows)
    assert all((r["error"] is None) == r["passed"] for r in rows)
    passed = {t: sum(r["passed"] for r in rows if r["task_id"] == t) for t in ("Toy/0", "Toy/1")}
    assert result["humaneval_pass@1"] == pytest.approx(sum(c / 3 for c in passed.values()) / 2)
    # pass@2 with n=3: 1 - C(3-c, 2) / C(3, 2) = 1 - {3, 1, 0, 0}[c] / 3
    assert result["humaneval_pass@2"] == pytest.approx(
        sum(1 - [3, 1, 0, 0][c] / 3 for c in passed.values()) / 2)
    assert "humaneval_pass@2" in capsys.readouterr().out

    # run again: the same sampled completions (seeded), written beside, nothing overwritten
    assert main(argv) == 0
    again = [json.loads(line) for line in (tmp_path / "eval-1.humaneval.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]
    assert main(["eval", "--adapter", summary["final_adapter"], "--humaneval", "--limit", "1",
                 "--max-new-tokens", "4", "--problems", str(problems)]) == 0
    assert (run_dir / "humaneval-1.jsonl").is_file()  # the run's own log is kept
    assert len((run_dir / "humaneval.jsonl").read_text().splitlines()) == 2


def test_humaneval_options_are_checked_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    (tmp_path / "final").mkdir()
    argv = ["eval", "--adapter", str(tmp_path / "final"), "--humaneval"]
    assert main([*argv, "--samples", "2", "--k", "5"]) == 2
    assert "k <= samples (2)" in capsys.readouterr().err
    assert main([*argv, "--problems", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
