"""`fedtune eval`: evaluate a saved adapter (or model) on a test set, after training.

The adapter directory is a run's `final/` (or any PEFT adapter / model directory). The recipe comes
from the run directory next to it unless one is given; a standalone adapter without one gets the
built-in default recipe on the base model its adapter_config.json names. The test set is the
recipe's global test set, or `--data FILE` in any input format fedtune reads; the metrics are the
recipe's `eval.metrics` (the same rules as during training) unless `--metrics` names others, and the
answers go to a predictions JSONL. `--humaneval` adds HumanEval pass@k (completions tested in the
sandbox only).
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
from fedtune.eval.predictions import write_predictions
from fedtune.eval.text_metrics import METRICS


def adapter_base_model(adapter: Path) -> str | None:
    """`base_model_name_or_path` of the adapter's adapter_config.json (None if absent)."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not readable JSON ({exc})") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base.strip() else None


def recipe_for(adapter: Path, recipe: str | None, overrides: list[str]) -> Recipe:
    """The given recipe, else the one saved in the run directory that holds `adapter`, else (a
    standalone adapter) the built-in default recipe on the base model its adapter_config.json names
    (or `model.name=` from the overrides)."""
    if not adapter.exists():
        raise ModelError(f"--adapter {adapter}: not found")
    if not adapter.is_dir():
        raise ModelError(f"--adapter {adapter}: not a directory")
    if recipe is not None:
        return load_recipe(recipe, overrides)
    saved = adapter.parent / "recipe.yaml"
    if saved.is_file():
        return load_recipe(str(saved), overrides)
    if any(o.split("=", 1)[0].strip() == "model.name" for o in overrides):
        return load_recipe(None, overrides)
    if (adapter / "config.json").is_file() and not (adapter / "adapter_config.json").is_file():
        return load_recipe(None, overrides)  # a whole model: it is its own base
    base = adapter_base_model(adapter)
    if base is None:
        raise ModelError(f"--adapter {adapter}: no recipe.yaml next to it and no base model named in "
                         "its adapter_config.json; add model.name=PATH_OR_HUB_ID (or give the recipe "
                         "it was trained with)")
    return load_recipe({"model": {"name": base}}, overrides)


def load_adapted_model(adapter: Path, recipe: Recipe):
    """The base model of the recipe with the adapter applied (or a whole saved model)."""
    from peft import PeftModel

    from fedtune.models.adapters import apply_bitfit, is_bitfit_dir
    from fedtune.models.loading import load_base_model

    if not adapter.exists():
        raise ModelError(f"--adapter {adapter}: not found")
    if not adapter.is_dir():
        raise ModelError(f"--adapter {adapter}: not a directory")
    if (adapter / "adapter_config.json").is_file():
        model, tokenizer = load_base_model(recipe.model)
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            made_for = adapter_base_model(adapter)
            raise ModelError(
                f"--adapter {adapter} does not fit the recipe's model {recipe.model.name!r}"
                + (f" (it was made for {made_for!r})" if made_for else "")
                + f": {reason}; give the recipe it was trained with, or model.name=...") from None
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
                     predictions_path: str | Path | None = None,
                     console: Console | None = None) -> dict[str, Any]:
    """Test-set metrics (unless `test_set` is False; `metrics` default to the recipe's
    `eval.metrics`, the answers written to `predictions_path`, default
    `predictions/eval_<adapter>.jsonl` beside the adapter, never over an existing file), multiple
    choice with `mc` (default the recipe's `eval.mc` when it measures mc_accuracy), and HumanEval
    pass@k with `humaneval` (options over the recipe's `eval.humaneval`, `{}` for those alone; the
    per-sample JSONL at `samples_path`, default beside the adapter, never over an existing file)."""
    from fedtune.eval.multiple_choice import load_mc_items, mc_accuracy

    adapter = Path(adapter)
    loaded = recipe_for(adapter, recipe, list(overrides or []))
    if metrics is None:
        metrics = [m for m in loaded.eval.metrics if m != "mc_accuracy"]
        if mc is None and "mc_accuracy" in loaded.eval.metrics:
            mc = loaded.eval.mc
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        hint = "; multiple choice is --mc FILE" if "mc_accuracy" in unknown else ""
        raise ModelError(f"--metrics: unknown {unknown}; known: {', '.join(METRICS)}{hint}")
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
    standalone = recipe is None and not (adapter.parent / "recipe.yaml").is_file()
    test_name = "the default recipe's test set (synthetic; give --data)" if standalone else "recipe test set"
    shown = (data or test_name) if test_set else ("HumanEval" if humaneval else "-")
    result: dict[str, Any] = {"adapter": str(adapter), "data": shown}
    if test_set:
        where = Path(predictions_path) if predictions_path else (
            adapter.parent / "predictions" / f"eval_{adapter.name}.jsonl")
        result.update(_test_set_metrics(evaluator, loaded, data, metrics, limit, where))
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
                      limit: int | None, predictions: Path) -> dict[str, Any]:
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
    scores, records = evaluator.generation_metrics(examples, metrics)
    result.update(scores)
    if records:
        from fedtune.eval.humaneval_run import free_path

        try:
            result["predictions_file"] = str(write_predictions(free_path(predictions), records))
        except OSError as exc:
            raise EvalError(f"cannot write the predictions to {predictions}: {exc}; "
                            "give --output FILE to write them beside it") from None
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
