"""`fedtune eval`: evaluate a saved adapter (or model) on a test set, after training.

The adapter directory is a run's `final/` (or any PEFT adapter / model directory). The recipe comes
from the run directory next to it unless one is given; the test set is the recipe's global test
set, or `--data FILE` in any input format fedtune reads. `--humaneval` adds HumanEval pass@k
(completions tested in the sandbox only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from fedtune.config import HumanEvalSection, Recipe, load_recipe
from fedtune.errors import ModelError
from fedtune.eval.errors import EvalError
from fedtune.eval.evaluator import Evaluator
from fedtune.eval.text_metrics import METRICS, mean_metric


def recipe_for(adapter: Path, recipe: str | None, overrides: list[str]) -> Recipe:
    """The given recipe, else the one saved in the run directory that holds `adapter`."""
    if recipe is None:
        saved = adapter.parent / "recipe.yaml"
        if not saved.is_file():
            raise ModelError(f"{adapter}: no recipe.yaml next to it; give the recipe the model was trained with")
        recipe = str(saved)
    return load_recipe(recipe, overrides)


def load_adapted_model(adapter: Path, recipe: Recipe):
    """The base model of the recipe with the adapter applied (or a whole saved model)."""
    from peft import PeftModel

    from fedtune.models.adapters import apply_bitfit, is_bitfit_dir
    from fedtune.models.loading import load_base_model

    if not adapter.is_dir():
        raise ModelError(f"--adapter {adapter}: not a directory")
    if (adapter / "adapter_config.json").is_file():
        model, tokenizer = load_base_model(recipe.model)
        model = PeftModel.from_pretrained(model, str(adapter))
    elif is_bitfit_dir(adapter):  # bitfit saves the trained biases only
        model, tokenizer = load_base_model(recipe.model)
        apply_bitfit(model, adapter)
    elif (adapter / "config.json").is_file():  # full fine-tuning saves a whole model
        model, tokenizer = load_base_model(recipe.model.model_copy(update={"name": str(adapter)}))
    else:
        raise ModelError(f"--adapter {adapter}: neither a PEFT adapter nor a model directory")
    return model.eval(), tokenizer


def evaluate_adapter(adapter: str | Path, recipe: str | None = None, overrides: list[str] | None = None,
                     *, data: str | None = None, metrics: list[str] | None = None,
                     mc: str | None = None, limit: int | None = None,
                     humaneval: dict[str, Any] | None = None, test_set: bool = True,
                     samples_path: str | Path | None = None,
                     console: Console | None = None) -> dict[str, Any]:
    """Test-set metrics (unless `test_set` is False), multiple choice with `mc`, and HumanEval
    pass@k with `humaneval` (options over the recipe's `eval.humaneval`, `{}` for those alone; the
    per-sample JSONL at `samples_path`, default beside the adapter, never over an existing file)."""
    from fedtune.eval.multiple_choice import load_mc_items, mc_accuracy

    adapter = Path(adapter)
    loaded = recipe_for(adapter, recipe, list(overrides or []))
    metrics = metrics or ["exact_match"]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ModelError(f"--metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    section = problems = None
    if humaneval is not None:  # bad options or problems fail before the model is loaded
        from fedtune.eval.humaneval import load_problems

        section = humaneval_options(loaded, humaneval)
        problems = load_problems(section.problems)
    model, tokenizer = load_adapted_model(adapter, loaded)
    device = next(model.parameters()).device
    d = loaded.data
    evaluator = Evaluator(model, tokenizer, loaded.eval, template=d.template,
                          max_length=d.max_length, device=device)
    shown = (data or "recipe test set") if test_set else ("HumanEval" if humaneval else "-")
    result: dict[str, Any] = {"adapter": str(adapter), "data": shown}
    if test_set:
        result.update(_test_set_metrics(evaluator, loaded, data, metrics, limit))
    if mc is not None:
        with torch.no_grad():
            result.update(mc_accuracy(model, tokenizer, load_mc_items(mc), device))
    if section is not None:
        from fedtune.eval.humaneval_run import run_humaneval

        path = Path(samples_path) if samples_path else adapter.parent / "humaneval.jsonl"
        result.update(run_humaneval(evaluator, section, seed=loaded.seed, samples_path=path,
                                    console=console, problems=problems))
    return result


def humaneval_options(recipe: Recipe, given: dict[str, Any]) -> HumanEvalSection:
    """The recipe's `eval.humaneval` (or the defaults) with the `given` options over it."""
    base = recipe.eval.humaneval.model_dump() if recipe.eval.humaneval is not None else {}
    if "samples" in given and "k" not in given:
        base.pop("k", None)  # recomputed for the new number of samples
    try:
        return HumanEvalSection.model_validate({**base, **given})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise EvalError(f"HumanEval options: {problems}") from None


def _test_set_metrics(evaluator: Evaluator, loaded: Recipe, data: str | None, metrics: list[str],
                      limit: int | None) -> dict[str, Any]:
    from fedtune.data.federated import build_federated_data
    from fedtune.data.prompts import tokenize_examples
    from fedtune.data.records import load_examples

    d = loaded.data
    if data is not None:
        examples = load_examples(data, format=d.format, fields=d.fields)
    else:
        examples = build_federated_data(d, loaded.federation.clients, loaded.seed).test
    examples = examples[:limit] if limit else examples
    tokenized, _ = tokenize_examples(examples, evaluator.tokenizer, template=d.template,
                                     max_length=d.max_length, truncation=d.truncation)
    result: dict[str, Any] = evaluator.loss(tokenized)
    predictions = evaluator.generate(examples)
    for name in metrics:
        result[name] = mean_metric(name, predictions, [ex.output for ex in examples])
    return result


def print_result(result: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=f"fedtune eval: {result['adapter']} on {result['data']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key not in ("adapter", "data"):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    (console or Console()).print(table)


def write_result(result: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
