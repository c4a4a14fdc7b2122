"""Where `model.name` comes from: a built-in model, a local directory, or the Hugging Face hub.

Nothing here imports torch or transformers, so the command line can check a hub id in a second,
before the seconds those take to load.
"""

from __future__ import annotations

import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from fedtune.config import ModelSection
from fedtune.errors import ModelError

log = logging.getLogger("fedtune.models")

BUILTIN_MODELS = {"builtin:tiny": "tiny"}


def resolve_model_path(name: str) -> str:
    """`builtin:NAME` -> the shipped directory; anything else is returned as is (path or hub id)."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ModelError(
                f"model.name: unknown built-in model {name!r}; available: {', '.join(BUILTIN_MODELS)}"
            )
        return str(resources.files("fedtune") / "assets" / BUILTIN_MODELS[name])
    return name


HUB_TIMEOUT = 5.0   # seconds to wait for the hub before calling it unreachable
_ANSWERS: dict[tuple[str, str | None], dict[str, Any]] = {}


def hub_access(section: ModelSection) -> dict[str, Any]:
    """Extra from_pretrained arguments for `model.name`, after a quick look at the hub.

    Without network, transformers retries a hub id for about a minute before failing. A hub id
    (not a built-in name, not an existing directory) is therefore looked up once, with a short
    timeout: if the hub answers, loading goes on as usual; if it says the id does not exist, or
    cannot be reached and no copy is cached, a ModelError says so at once; if it cannot be
    reached but a copy is cached, that copy is used (`local_files_only`). With HF_HUB_OFFLINE=1
    the hub is never asked; a model that is not cached then fails at once.
    """
    name = section.name
    path = resolve_model_path(name)
    if path != name or Path(path).exists():
        return {}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name {name!r}: no such directory (and not a hub id, which looks "
                         "like ORG/NAME)")
    from huggingface_hub import constants, try_to_load_from_cache

    offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
    if offline:
        if isinstance(try_to_load_from_cache(name, "config.json", revision=section.revision), str):
            return {}
        raise ModelError(
            f"model.name {name!r}: HF_HUB_OFFLINE is set and no copy of this model is cached "
            "(HF_HOME). Download it once with network (HF_HUB_OFFLINE unset), or point model.name "
            "at a local directory (a save_pretrained copy of the model and tokenizer)."
        )
    key = (name, section.revision)
    if key in _ANSWERS:  # asked already by this process (the command line asks before loading)
        return dict(_ANSWERS[key])
    problem = _ask_hub(name, section.revision)
    if problem is None:
        _ANSWERS[key] = {}
        return {}
    cached = try_to_load_from_cache(name, "config.json", revision=section.revision)
    if isinstance(cached, str):
        log.warning("the Hugging Face hub cannot be reached (%s); using the cached copy of %s",
                    problem, name)
        _ANSWERS[key] = {"local_files_only": True}
        return dict(_ANSWERS[key])
    raise ModelError(
        f"model.name {name!r}: the Hugging Face hub cannot be reached ({problem}) and no copy of "
        f"this model is cached (HF_HOME). {OFFLINE_HINT}"
    )


OFFLINE_HINT = ("Point model.name at a local directory (a save_pretrained copy of the model and "
                 "tokenizer), download it where there is network, or set HF_HUB_OFFLINE=1 to use "
                 "only cached models without trying the network (docs/recipes.md).")


def _ask_hub(repo_id: str, revision: str | None) -> str | None:
    """None when the hub answers (or errs on its side); why not when it cannot be reached.

    Raises ModelError when the hub says the id or revision does not exist.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
            outcome["error"] = None
        except Exception as exc:
            outcome["error"] = exc

    # In a thread, so that a hanging name lookup (not covered by the HTTP timeout) cannot hold us.
    thread = threading.Thread(target=ask, name="fedtune-hub-check", daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT + 1.0)
    if "error" not in outcome:
        return f"no answer within {HUB_TIMEOUT:.0f} s"
    error = outcome["error"]
    if error is None:
        return None
    if isinstance(error, HFValidationError):
        raise ModelError(f"model.name {repo_id!r} is neither a local directory nor a valid hub id "
                         "(ORG/NAME)")
    if isinstance(error, RevisionNotFoundError):
        raise ModelError(f"model.revision {revision!r} does not exist for {repo_id!r} on the hub")
    if isinstance(error, RepositoryNotFoundError):
        raise ModelError(
            f"model.name {repo_id!r} is not on the Hugging Face hub (or is private: log in with "
            f"`hf auth login` or set HF_TOKEN), and is not a local directory. {OFFLINE_HINT}"
        )
    if isinstance(error, HfHubHTTPError):
        return None  # the hub answered; let transformers report what it says
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return first
