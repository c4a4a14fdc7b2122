"""Loading a Recipe: YAML files, built-in names, dicts, and key=value overrides; every error
names the file and line (or the override as typed), the key path and what is allowed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from fedtune.config.schema import Recipe
from fedtune.errors import RecipeError


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped with fedtune."""
    root = resources.files("fedtune") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Key path -> 1-based line number, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def split_recipe_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Command-line items -> (the recipe, if any, and the key.path=value overrides)."""
    recipe, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif recipe is None:
            recipe = item
        else:
            raise RecipeError(f"two recipes given ({recipe!r} and {item!r}); overrides look like key.path=value")
    return recipe, overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`federation.rounds=3` -> (['federation', 'rounds'], 3); values are parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"command line: {text}: expected KEY.PATH=VALUE, e.g. federation.rounds=5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"command line: {text}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"command line: {text}: the value is not valid YAML ({exc})") from None
    return path, value


def _apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise RecipeError(f"command line: {text}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        # An optional section (`X | None`): the keys of X.
        model = next((a for a in get_args(model) if hasattr(a, "model_fields")), model)
    return list(getattr(model, "model_fields", {}))


def _where(loc: tuple[str, ...], origin: str, lines: dict[tuple[str, ...], int],
           overrides: dict[str, str]) -> str:
    """Where an error at key path `loc` comes from: the override that set it (as typed on the
    command line), else the recipe file's line, naming any overrides below `loc` as well."""
    key = ".".join(loc)
    for path, text in reversed(overrides.items()):  # the last override of a key is the one used
        if key == path or key.startswith(path + "."):
            return f"command line: {text}"
    in_file = next((f"{origin}, line {lines[loc[:n]]}" for n in range(len(loc), 0, -1)
                    if loc[:n] in lines), origin)
    below = [text for path, text in overrides.items() if not key or path.startswith(key + ".")]
    if below:
        return f"command line: {', '.join(below)} (with {in_file})"
    return in_file


def _format_errors(
    exc: ValidationError, origin: str, lines: dict[tuple[str, ...], int], overrides: dict[str, str]
) -> str:
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if p != "[key]")   # a mapping's key (tune.params)
        key = ".".join(loc) or "(top level)"
        where = _where(loc, origin, lines, overrides)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(tuple(err["loc"][:-1]))
            msg = f"unknown key; allowed here: {', '.join(allowed)}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error", "missing") and "input" in err:
                msg += f" (got {err['input']!r})"
        out.append(f"  {where}: {key}: {msg}")
    return "invalid recipe:\n" + "\n".join(out)


def load_recipe(
    source: str | Path | dict | Recipe | None = None, overrides: list[str] | None = None
) -> Recipe:
    """Load a recipe from a built-in name, a YAML path, a dict or a Recipe, then apply overrides."""
    overrides = list(overrides or [])
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(source, Recipe):
        data, origin = source.model_dump(mode="json"), "recipe"
    elif isinstance(source, dict):
        data, origin = dict(source), "recipe"
    else:
        path = _resolve_recipe_path(source)
        origin = str(path)
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
        lines = _line_map(text)
    override_keys: dict[str, str] = {}   # key path -> the argument as typed
    for text in overrides:
        keypath, value = parse_override(text)
        _apply_override(data, keypath, value, text)
        override_keys.pop(".".join(keypath), None)
        override_keys[".".join(keypath)] = text
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, origin, lines, override_keys)) from None


def _resolve_recipe_path(source: str | Path | None) -> Path:
    recipes = builtin_recipes()
    if source is None:
        return recipes["default"]
    path = Path(source)
    if path.is_file():
        return path
    if str(source) in recipes:
        return recipes[str(source)]
    raise RecipeError(
        f"recipe {str(source)!r} is neither a file nor a built-in recipe; "
        f"built-in: {', '.join(sorted(recipes))} (see `fedtune recipes`)"
    )
