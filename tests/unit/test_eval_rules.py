"""One answer rule per metric, the same in training-time evaluation and `fedtune eval`; the recipe keys
that choose metrics; the closing table naming what was measured."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from fedtune.config import EvalSection, load_recipe
from fedtune.data.examples import Example
from fedtune.errors import RecipeError
from fedtune.eval.evaluator import Evaluator
from fedtune.eval.predictions import predictions_path, read_predictions, write_predictions
from fedtune.eval.runner import _test_set_metrics
from fedtune.track.report import closing_table

# (model output, reference): exact match says 1 of 3, the GSM8K rule 2 of 3.
CANNED = [
    ("The answer is 15. Then 16 more", "Tom has 15 apples. The answer is 15."),  # marker wins: 15
    ("the answer is 16", "The answer is 16."),  # same after normalisation, and the same number
    ("I think 3", "#### 4"),
]


def _evaluator(tokenizer, metrics: list[str]) -> Evaluator:
    ev = Evaluator(None, tokenizer, EvalSection(metrics=metrics), template="compact",
                   max_length=128, device=torch.device("cpu"))
    answers = {f"q{i}": out for i, (out, _) in enumerate(CANNED)}
    ev.generate = lambda examples: [answers[ex.instruction] for ex in examples]  # a model's outputs
    ev.loss = lambda tokenized: {"n_examples": len(tokenized)}
    return ev


def _examples() -> list[Example]:
    return [Example(instruction=f"q{i}", output=ref) for i, (_, ref) in enumerate(CANNED)]


def test_each_metric_has_one_rule_on_hand_written_outputs(char_tokenizer):
    ev = _evaluator(char_tokenizer, ["exact_match", "gsm8k", "rouge_l"])
    scores, records = ev.generation_metrics(_examples())
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["gsm8k"] == pytest.approx(2 / 3)  # "The answer is 15. Then 16 more" -> 15: right
    assert [r["gsm8k"] for r in records] == [1.0, 1.0, 0.0]
    assert [r["output"] for r in records] == [out for out, _ in CANNED]
    assert records[0]["reference"] == CANNED[0][1] and "q0" in records[0]["prompt"]
    # Rouge-L of row 2: "the answer is 16" vs "the answer is 16" -> 1.0; row 3 shares no word -> 0
    assert records[1]["rouge_l"] == pytest.approx(1.0) and records[2]["rouge_l"] == 0.0


def test_fedtune_eval_scores_the_same_outputs_the_same_way(char_tokenizer, tmp_path):
    recipe = load_recipe(None, ["eval.metrics=[gsm8k,exact_match]", "data.template=compact"])
    ev = _evaluator(char_tokenizer, recipe.eval.metrics)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": ex.instruction, "output": ex.output}) + "\n"
                            for ex in _examples()))
    during_training = ev.evaluate([], _examples(), with_generation=True)
    after = _test_set_metrics(ev, recipe, str(data), recipe.eval.metrics, None, tmp_path / "p.jsonl")
    assert after["gsm8k"] == during_training["gsm8k"] == pytest.approx(2 / 3)
    assert after["exact_match"] == during_training["exact_match"] == pytest.approx(1 / 3)
    rows = read_predictions(after["predictions_file"])
    assert [(r["output"], r["gsm8k"]) for r in rows] == [(o, g) for (o, _), g in zip(CANNED, [1.0, 1.0, 0.0])]


def test_no_generation_metric_means_no_generation(char_tokenizer):
    ev = _evaluator(char_tokenizer, [])
    ev.generate = lambda examples: pytest.fail("generated although no metric asks for it")
    assert ev.evaluate([], _examples(), with_generation=True) == {"n_examples": 0}


def test_old_answer_keys_map_to_metrics_and_the_saved_recipe_uses_the_new_key():
    assert load_recipe(None, ["eval.answer=last_number"]).eval.metrics == ["gsm8k"]
    assert load_recipe(None, ["eval.exact_match=false"]).eval.metrics == []
    assert load_recipe(None, ["eval.answer=full"]).eval.metrics == ["exact_match"]
    assert "answer" not in load_recipe(None, ["eval.answer=last_number"]).to_yaml()
    with pytest.raises(RecipeError, match="replaced by eval.metrics"):
        load_recipe(None, ["eval.answer=last_number", "eval.metrics=[gsm8k]"])


@pytest.mark.parametrize("overrides,pattern", [
    (["eval.metrics=[bleu]"], "eval.metrics"),
    (["eval.metrics=[gsm8k,gsm8k]"], "twice"),
    (["eval.metrics=[mc_accuracy]"], "eval.mc"),
    (["output.keep_best=rouge_l"], "not measured"),
    (["output.keep_best=val_loss", "data.val_fraction=0"], "val_fraction"),
    (["output.keep_best=val_loss", "eval.clients=false"], "eval.clients"),
    (["output.keep_best=loss", "data.test_fraction=0"], "test_fraction is 0"),
    (["eval.every=0", "eval.early_stopping={patience: 2}"], "eval.every"),
    (["eval.every=1", "eval.early_stopping={metric: bleu}"], "not measured"),
])
def test_selection_settings_that_cannot_work_are_refused(overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(None, overrides)


def test_predictions_files_are_named_by_round_and_scope(tmp_path):
    path = predictions_path(tmp_path / "predictions", 40, "global")
    assert path.name == "round_0040_global.jsonl"
    assert predictions_path(tmp_path, 3, "../evil").name == "round_0003_.._evil.jsonl"
    write_predictions(path, [{"prompt": "p", "reference": "r", "output": "o"}] * 3)
    assert read_predictions(path, 2) == [{"index": 0, "prompt": "p", "reference": "r", "output": "o"},
                                         {"index": 1, "prompt": "p", "reference": "r", "output": "o"}]


def _summary(**extra):
    return {"recipe": "r", "algorithm": "fedavg", "adapter": "lora", "rounds": 2, "clients": 2,
            "bytes_down": 10, "bytes_up": 5, "adapter_parameters": 8, "adapter_bytes": 32,
            "wall_seconds": 1.0, "train_seconds": 0.5, "eval_seconds": 0.2, "per_client": {}, **extra}


def _text(table) -> str:
    console = Console(record=True, width=220)
    console.print(table)
    return console.export_text()


def test_closing_table_names_the_metrics_that_were_measured():
    text = _text(closing_table(_summary(
        initial={"loss": 2.0, "perplexity": 7.39, "gsm8k": 0.0, "n_examples": 4},
        final={"loss": 1.0, "perplexity": 2.72, "gsm8k": 0.5, "val_loss": 1.25, "n_examples": 4})))
    assert "GSM8K acc" in text and "50.0%" in text and "val loss" in text and "1.2500" in text
    assert "exact match" not in text


def test_empty_test_set_shows_no_loss_and_dp_epsilon_is_on_the_console():
    text = _text(closing_table(_summary(
        adapter="prompt_tuning", initial={"n_examples": 0}, final={"n_examples": 0},
        strategy={"epsilon": 3.5, "delta": 1e-5, "clipped_fraction": 0.1})))
    assert "0.0000" not in text and "1.00" not in text
    assert "ε = 3.50" in text and "δ = 1e-05" in text
    assert "base + random virtual tokens" in text
    local = _text(closing_table(_summary(dp_sgd={"max_epsilon": 8.0, "delta": 1e-5, "clients": {}})))
    assert "DP-SGD (clients): ε ≤ 8.00, δ = 1e-05" in local


def test_closing_table_shows_a_dash_for_what_is_not_a_finite_number():
    text = _text(closing_table(_summary(
        final={"loss": float("nan"), "perplexity": 10**400, "gsm8k": "0.5", "n_examples": 4})))
    row = next(line for line in text.splitlines() if "federated" in line)
    assert row.count("-") >= 3 and "nan" not in row.lower()
