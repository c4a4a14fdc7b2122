"""A study of `fedtune tune`: Optuna's sampler, pruner and storage built from the recipe's `tune`
section, and the objective, which runs one full federated simulation per trial.

Rounds are the budget: after each evaluation during training the trial reports the metric to
Optuna (`trial.report`, step = round) and stops cleanly when the pruner says so.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fedtune.config import Recipe, load_recipe
from fedtune.config.tune import TuneSection
from fedtune.errors import FedtuneError, RecipeError

COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
HEARTBEAT_SECONDS = 30   # a worker's running trial is marked failed this long after it died
GRACE_SECONDS = 120


class TuneError(FedtuneError):
    """A study that cannot start or continue (exists already, nothing to resume, another recipe)."""


@dataclass
class StudyPlace:
    """Where a study lives: its directory (trial runs, reports) and its storage URL."""

    name: str
    dir: Path
    storage: str


def study_place(recipe: Recipe, storage: str | None = None) -> StudyPlace:
    tune = _tune(recipe)
    name = tune.study or recipe.name
    directory = Path(recipe.output.dir) / f"tune-{name}"
    url = storage or tune.storage or f"sqlite:///{(directory / 'study.db').resolve()}"
    return StudyPlace(name, directory, url)


def _tune(recipe: Recipe) -> TuneSection:
    if recipe.tune is None:
        raise RecipeError(f"recipe {recipe.name!r} has no tune section; add one (docs/tune.md), "
                          "e.g. tune: {params: {train.lr: {type: log_uniform, low: 1e-4, high: 1e-2}}}")
    return recipe.tune


# -- the trials' recipes --------------------------------------------------------------------------


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def trial_recipe(base: Recipe, values: dict[str, Any], *, fidelity: bool = True,
                 output: dict[str, Any] | None = None) -> Recipe:
    """The recipe of a trial: `base` without its tune section, the low-fidelity knobs (unless
    `fidelity` is False), the trial's `values` and `output` keys set. Errors name the values."""
    tune = _tune(base)
    data = base.model_dump(mode="json")
    data["tune"] = None
    for key, value in {**(tune.fidelity if fidelity else {}), **values}.items():
        _set(data, key, value)
    for key, value in (output or {}).items():
        data["output"][key] = value
    try:
        return load_recipe(data)
    except RecipeError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise RecipeError(f"tune: the trial values {shown} make an invalid recipe:\n{exc}") from None


def check_space(base: Recipe) -> None:
    """Every searched value at its edges (and every choice), each in turn with the others at the
    recipe's own values, loads as a recipe: a bad range fails before the first trial."""
    tune = _tune(base)
    for key, param in tune.params.items():
        for value in param.endpoints():
            try:
                trial_recipe(base, {key: value})
            except RecipeError as exc:
                raise RecipeError(f"tune.params.{key}: the value {value!r} makes an invalid "
                                  f"recipe:\n{str(exc).split('invalid recipe:' + chr(10), 1)[-1]}") from None


def suggest(trial: optuna.Trial, tune: TuneSection) -> dict[str, Any]:
    """The trial's values, one per searched key path."""
    values: dict[str, Any] = {}
    for key, p in tune.params.items():
        if p.type == "categorical":
            values[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1),
                                            log=p.log)
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, step=p.step,
                                              log=p.type == "log_uniform")
    return values


# -- Optuna's parts -------------------------------------------------------------------------------


def make_sampler(tune: TuneSection, seed: int) -> optuna.samplers.BaseSampler:
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "grid":
        return optuna.samplers.GridSampler({k: p.grid() for k, p in tune.params.items()}, seed=seed)
    if tune.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise TuneError("tune.sampler cmaes needs the cmaes package: pip install 'fedtune[tune]'") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # TPE samples at random until it has n_startup_trials trials (Optuna's default 10): on a
    # budget of a few whole runs, a third of them (at least 2, at most 10).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, tune.trials // 3)))


def make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    p, every = _tune(recipe).pruner, max(1, recipe.eval.every)
    if p.name == "median_stopping":
        warmup = recipe.federation.rounds // 4 if p.warmup_rounds is None else p.warmup_rounds
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials,
                                           n_warmup_steps=warmup, interval_steps=1)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_rounds or every,
                                                      reduction_factor=p.reduction_factor)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_rounds or every,
                                              max_resource=recipe.federation.rounds,
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Any SQLAlchemy URL; SQLite waits for a writer of another process instead of failing.
    Running trials beat a heartbeat: a worker that died leaves its trial failed (and retried)."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):   # optuna >= 4.9
                kwargs["heartbeat_stale_trial_callback"] = \
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
            else:
                kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=1)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS, **kwargs)
    except Exception as exc:   # SQLAlchemy's errors: a bad URL, a driver not installed, no server
        raise TuneError(f"tune storage {url!r}: {type(exc).__name__}: {exc}") from None


# -- the objective --------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class Objective:
    """One trial: sample, run the federated simulation in its own directory, report evaluations."""

    def __init__(self, base: Recipe, place: StudyPlace, run=None, log=print):
        self.base, self.place, self.tune, self.log = base, place, _tune(base), log
        if run is None:
            from fedtune.runtime.simulation import run
        self.run = run

    def __call__(self, trial: optuna.Trial) -> float:
        tune = self.tune
        values = suggest(trial, tune)
        name = f"trial-{trial.number:04d}"
        try:
            recipe = trial_recipe(self.base, values, output={
                "dir": str(self.place.dir / "trials"), "name": name, "progress": False})
        except RecipeError as exc:   # each value loads alone (check_space), two together may not
            self.log(f"{name}: failed: {exc}")
            trial.set_user_attr("error", str(exc))
            raise
        run_dir = self.place.dir / "trials" / name
        trial.set_user_attr("run_dir", str(run_dir))
        self.log(f"{name}: {', '.join(f'{k}={_shown(v)}' for k, v in values.items())}")
        pruned_at: list[int] = []

        def on_eval(round_: int, metrics: dict[str, Any]) -> bool:
            value = _number(metrics.get(tune.metric))
            if value is None:
                return False
            trial.report(value, round_)
            if trial.should_prune():
                pruned_at.append(round_)
                return True
            return False

        started = time.perf_counter()
        try:
            summary = self.run(recipe, on_eval=on_eval)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except FedtuneError as exc:   # e.g. a client's training diverged (NaN): this trial fails
            self.log(f"{name}: failed after {time.perf_counter() - started:.0f} s: "
                     f"{type(exc).__name__}: {exc}")
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            trial.set_user_attr("wall_seconds", round(time.perf_counter() - started, 3))
            raise
        wall = time.perf_counter() - started
        final = summary.get("final") or {}
        trial.set_user_attr("wall_seconds", round(wall, 3))
        trial.set_user_attr("rounds", summary.get("rounds"))
        trial.set_user_attr("final", {k: v for k, v in final.items() if _number(v) is not None})
        if pruned_at:
            self.log(f"{name}: pruned at round {pruned_at[0]} ({wall:.0f} s)")
            raise optuna.TrialPruned(f"pruned at round {pruned_at[0]}")
        value = _number(final.get(tune.metric))
        if value is None:   # diverged (no finite metric): the worst value, kept in the study
            trial.set_user_attr("diverged", True)
            value = -math.inf if tune.maximize else math.inf
        self.log(f"{name}: {tune.metric} {value:.4g} ({wall:.0f} s)")
        return value


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- the study ------------------------------------------------------------------------------------


def base_recipe_text(recipe: Recipe) -> str:
    """The recipe a study is bound to, without tune.trials (a resumed study may ask for more)."""
    data = recipe.model_dump(mode="json")
    data["tune"]["trials"] = None
    return json.dumps(data, sort_keys=True)


def open_study(recipe: Recipe, place: StudyPlace, *, resume: bool) -> optuna.Study:
    """Create the study, or (resume) load it; refuses to mix up a study with another recipe."""
    tune = _tune(recipe)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    storage = make_storage(place.storage)
    exists = place.name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if exists and not resume:
        raise TuneError(f"study {place.name!r} exists in {place.storage}; --resume continues it "
                        "(or joins it as another worker), or set tune.study to start another")
    if not exists and resume:
        raise TuneError(f"no study {place.name!r} in {place.storage} to resume")
    seed = recipe.seed if tune.seed is None else tune.seed
    text = base_recipe_text(recipe)
    if not exists:
        study = optuna.create_study(
            study_name=place.name, storage=storage, direction="maximize" if tune.maximize else "minimize",
            sampler=make_sampler(tune, seed), pruner=make_pruner(recipe))
        study.set_user_attr("recipe", text)
        study.set_user_attr("metric", tune.metric)
        if tune.baseline and tune.sampler != "grid":   # a grid holds the recipe's values anyway
            own = baseline_values(recipe)
            if own:
                study.enqueue_trial(own, user_attrs={"baseline": True})
        return study
    study = optuna.load_study(study_name=place.name, storage=storage)
    if study.user_attrs.get("recipe") != text:
        raise TuneError(f"study {place.name!r} was started with another recipe or search "
                        f"space (see {place.dir / 'recipe.yaml'}); set tune.study to start another")
    # A resumed or joining worker draws its own random numbers: with the study's seed it would
    # propose the values the first worker proposed already.
    joined = zlib.crc32(f"{seed}:{len(study.trials)}:{os.getpid()}:{time.time_ns()}".encode())
    study = optuna.load_study(study_name=place.name, storage=storage,
                              sampler=make_sampler(tune, joined), pruner=make_pruner(recipe))
    _retry_interrupted(study)
    return study


def recipe_value(recipe: Recipe, path: str) -> Any:
    """The recipe's own value at a key path (an algorithm option it leaves out: its default)."""
    node: Any = recipe
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict):
            if part not in node and parts[:i] == ["federation", "options"]:
                from fedtune.algorithms.catalog import CATALOG

                field = CATALOG[recipe.federation.algorithm].config.model_fields.get(part)
                return None if field is None or field.is_required() else field.get_default()
            node = node.get(part)
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


def baseline_values(recipe: Recipe) -> dict[str, Any]:
    """The recipe's own values of the searched key paths that the search space holds: the study's
    first trial, so the untuned recipe is measured beside the tuned ones (values out of range
    are left to the sampler)."""
    out = {}
    for key, param in _tune(recipe).params.items():
        value = recipe_value(recipe, key)
        if value is not None and param.contains(value):
            out[key] = value
    return out


def _retry_interrupted(study: optuna.Study) -> None:
    """Trials stopped by Ctrl-C or SIGTERM run again with the same values (once each)."""
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(copy.deepcopy(t.params), user_attrs={"retry_of": t.number})


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def optimize(study: optuna.Study, objective: Objective, trials: int) -> None:
    """Run trials until the study holds `trials` complete or pruned ones (over every worker).

    A trial whose values clash or whose run fails with a fedtune error (a client's training
    diverged to NaN, ...) is marked failed and the study goes on; it stops once as many trials
    have failed as it was asked to run (something is wrong with every trial)."""
    if counted(study) >= trials:
        return

    def too_many_failures(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))) >= trials:
            study.stop()

    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(trials, states=COUNTED),
                                         too_many_failures],
                   gc_after_trial=True, catch=(FedtuneError,))
