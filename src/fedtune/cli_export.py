"""`fedtune export`: a trained adapter as a standalone directory, or merged into its base for serving."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from rich.console import Console

from fedtune.errors import ModelError, RunDirError


def _cmd_export(args: argparse.Namespace) -> int:
    from fedtune.config import split_recipe_args

    recipe, overrides = split_recipe_args(args.items)
    out = export(args.adapter, args.out, merge=args.merge, recipe=recipe, overrides=overrides)
    Console().print(f"{'merged model' if args.merge else 'adapter'} written to {out}")
    return 0


def add_export_command(sub) -> None:
    """Register `fedtune export` on the `fedtune` subparsers."""
    p = sub.add_parser(
        "export", help="export a trained adapter, or merge it into its base model (--merge)",
        description="Write ADAPTER (a run's final/ directory) to OUT. With --merge, OUT is a full "
                    "model (save_pretrained + tokenizer) that AutoModelForCausalLM loads, the "
                    "adapter folded into the base weights; without it, a standalone PEFT "
                    "directory whose adapter_config.json names the base. The recipe defaults "
                    "to the run's recipe.yaml. Example: fedtune export runs/x/final merged --merge")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("out", metavar="OUT")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.set_defaults(func=_cmd_export)


def _recipe(adapter: Path, recipe: str | None, overrides: list[str]):
    from fedtune.config import load_recipe

    if recipe is None:
        saved = adapter.parent / "recipe.yaml"
        if not saved.is_file():
            raise ModelError(f"{adapter}: no recipe.yaml next to it (not a run's final/); give "
                             "the recipe it was trained with: fedtune export ADAPTER OUT RECIPE")
        recipe = str(saved)
    return load_recipe(recipe, overrides)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out} already exists and is not empty; choose another output directory")


def export(adapter: str | Path, out: str | Path, *, merge: bool, recipe: str | None = None,
           overrides: list[str] | None = None) -> Path:
    """Export `adapter` to `out` (merged into the base with `merge`); returns `out`."""
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise ModelError(f"{adapter}: not found (expected a run's final/ directory)")
    _check_out(out)
    loaded = _recipe(adapter, recipe, list(overrides or []))
    if merge:
        _merge(adapter, out, loaded)
    else:
        _copy(adapter, out, loaded)
    return out


def _copy(adapter: Path, out: Path, recipe) -> None:
    """The adapter as is, its config naming the resolved base (a path or hub id)."""
    from fedtune.models.loading import resolve_model_path

    shutil.copytree(adapter, out, dirs_exist_ok=True)
    config = out / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = resolve_model_path(recipe.model.name)
        config.write_text(json.dumps(data, indent=2) + "\n")


def _merge(adapter: Path, out: Path, recipe) -> None:
    """Fold the adapter into full-precision base weights and save model and tokenizer."""
    from peft import PeftModel

    from fedtune.models.adapters import apply_bitfit, is_bitfit_dir
    from fedtune.models.loading import load_base_model

    section = recipe.model.model_copy(update={"quantization": "none"})  # merge into full precision
    if (adapter / "adapter_config.json").is_file():
        base, tokenizer = load_base_model(section)
        try:
            model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError, TypeError) as exc:
            method = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type", "?")
            raise ModelError(
                f"{adapter}: a {method} adapter cannot be merged into the base weights ({exc}); "
                "serve it with the base model and PeftModel.from_pretrained, or export it without "
                "--merge") from None
    elif is_bitfit_dir(adapter):
        model, tokenizer = load_base_model(section)
        apply_bitfit(model, adapter)
    elif (adapter / "config.json").is_file():  # full fine-tuning: already a whole model
        model, tokenizer = load_base_model(section.model_copy(update={"name": str(adapter)}))
    else:
        raise ModelError(f"{adapter}: neither a PEFT adapter, BitFit biases nor a model directory")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
