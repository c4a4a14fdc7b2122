"""What the `fedtune` commands share: the early recipe check and the resume hint."""

from __future__ import annotations

import shlex
from pathlib import Path


def check_early(recipe: str | None, overrides: list[str], resume: str | None = None) -> None:
    """Report a recipe error, a missing data file or an unreachable hub id now, before torch
    loads (seconds)."""
    from fedtune.config import load_recipe
    from fedtune.data.records import check_local_source
    from fedtune.models.hub import hub_access

    if resume is not None:
        path = Path(resume) / "recipe.yaml"
        if recipe is not None or overrides or not path.is_file():
            return  # the command's own checks say what is wrong
        loaded = load_recipe(path)
    else:
        loaded = load_recipe(recipe, overrides)
    for source in (loaded.data.source, loaded.data.test_source):
        if source is not None:
            check_local_source(source)
    hub_access(loaded.model)


def resume_hint(command: str, run_dir: str | Path | None) -> str:
    if run_dir is None:
        return "interrupted before the run directory was made; nothing to resume"
    return (f"interrupted; continue with `fedtune {command} --resume {shlex.quote(str(run_dir))}` "
            "(from its last checkpoint)")
