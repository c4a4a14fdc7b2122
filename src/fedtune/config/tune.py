"""The recipe's `tune` section: what `fedtune tune` searches (recipe key paths and their
distributions), the objective, the sampler, the pruner and the study's storage (docs/tune.md).

Only the shape lives here; optuna is imported by fedtune.tune alone, so loading a recipe stays fast.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    model_validator,
)

# Metrics whose smaller values are better (the rest are maximised by default).
LOWER_IS_BETTER = ("loss", "perplexity", "val_loss")
# Sections a trial may not change: the study's own, and where and how its trial runs are written.
FIXED_KEYS = ("tune", "output.dir", "output.name")
# Enumerated values of an int range on the grid sampler at most (a grid that size is a mistake).
MAX_GRID = 10_000


def _schema_field(model: Any, part: str) -> Any:
    """The annotation of `part` in the pydantic `model` (an optional `X | None` gives X)."""
    fields = getattr(model, "model_fields", None)
    if fields is None or part not in fields:
        return None
    annotation = fields[part].annotation
    return next((a for a in get_args(annotation) if hasattr(a, "model_fields")), annotation)


def check_key_path(path: str) -> str:
    """A recipe key path a trial may set (`train.lr`, `federation.options.server_lr`): every part
    a field of the schema, down to a value; inside a free mapping (federation.options,
    data.fields) one more key, which the mapping's owner checks when the trial's recipe loads."""
    from fedtune.config.schema import Recipe  # the schema imports this module

    parts = path.split(".")
    if not all(parts):
        raise ValueError(f"{path!r} is not a key path (write e.g. train.lr)")
    if any(path == key or path.startswith(key + ".") for key in FIXED_KEYS):
        raise ValueError(f"a trial may not set {', '.join(FIXED_KEYS)} (the study sets them)")
    model: Any = Recipe
    for i, part in enumerate(parts):
        annotation = _schema_field(model, part)
        if annotation is None:
            where = ".".join(parts[:i]) or "the recipe"
            allowed = ", ".join(getattr(model, "model_fields", {}))
            raise ValueError(f"{part!r} is not a key of {where}; allowed there: {allowed}")
        if get_origin(annotation) is dict:   # a free mapping: exactly one key below it
            if len(parts) != i + 2:
                raise ValueError(f"{'.'.join(parts[:i + 1])} is a mapping; name one key "
                                 f"in it, e.g. {'.'.join(parts[:i + 1])}.NAME")
            return path
        model = annotation
    if hasattr(model, "model_fields"):
        raise ValueError(f"{path} is a section, not a value; name one of its keys: "
                         f"{', '.join(model.model_fields)}")
    return path


KeyPath = Annotated[str, AfterValidator(check_key_path)]


class Section(BaseModel):   # as schema.Section (which imports this module)
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TuneParam(Section):
    """One searched value: `log_uniform`/`uniform` floats in [low, high], `int` in [low, high]
    (optionally `step`, or `log`), or one of `choices` (`categorical`)."""

    type: Literal["log_uniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> TuneParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs choices: [a, b, ...]")
            if any(isinstance(c, (dict, list)) for c in self.choices):
                raise ValueError("categorical choices must be plain values (numbers, strings, "
                                 "true/false, null)")
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("categorical takes choices only (no low, high, step)")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"needs finite low <= high (got {self.low}, {self.high})")
        if self.type == "log_uniform" and self.low <= 0:
            raise ValueError("log_uniform needs low > 0")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError("int needs whole numbers for low and high")
            if self.step is not None and self.step != int(self.step):
                raise ValueError("int needs a whole step")
            if self.log and (self.low < 1 or (self.step or 1) != 1):
                raise ValueError("int with log: true needs low >= 1 and no step")
        elif self.log:
            raise ValueError(f"log applies to int only ({self.type} is already "
                             f"{'log' if self.type == 'log_uniform' else 'linear'})")
        return self

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler (categorical and int only)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            step = int(self.step or 1)
            values = range(int(self.low), int(self.high) + 1, step)   # type: ignore[arg-type]
            if len(values) > MAX_GRID:
                raise ValueError(f"{len(values)} values: too many for the grid sampler")
            return list(values)
        raise ValueError(f"{self.type} is continuous: the grid sampler needs categorical or int "
                         "parameters (list the values as choices)")

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this distribution can propose."""
        if self.type == "categorical":
            return value in (self.choices or [])
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if self.type == "int" and (value != int(value) or (int(value) - int(self.low)) % int(self.step or 1)):
            return False
        return self.low <= value <= self.high   # type: ignore[operator]

    def endpoints(self) -> list[Any]:
        """The values a trial may take at the edges (each is checked against the recipe)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]   # type: ignore[arg-type]
        return [self.low, self.high]


class PrunerSection(Section):
    """Stopping poor trials early on their evaluations (rounds are the budget): `median_stopping` (below
    the median of earlier trials at the same round), `successive_halving`, `hyperband` or `none`."""

    name: Literal["median_stopping", "successive_halving", "hyperband", "none"] = "median_stopping"
    startup_trials: NonNegativeInt = 3     # median_stopping: trials run to the end before any pruning
    # median_stopping: no pruning before this round; default a quarter of federation.rounds (on the
    # built-in benchmark the ranking after 10 % of the rounds says almost nothing: docs/tune.md)
    warmup_rounds: NonNegativeInt | None = None
    min_rounds: PositiveInt | None = None  # halving/hyperband: the smallest budget (eval.every)
    reduction_factor: int = Field(3, ge=2)  # halving/hyperband: keep 1 in this many per rung


class TuneSection(Section):
    """`fedtune tune`: each trial is a full federated run of the recipe with `params` sampled."""

    params: dict[KeyPath, TuneParam] = Field(min_length=1)
    metric: str = "val_loss"
    direction: Literal["minimize", "maximize"] | None = None   # default: by the metric
    trials: PositiveInt = 20
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    pruner: PrunerSection = Field(default_factory=PrunerSection)
    seed: int | None = None                # default: the recipe's seed
    baseline: bool = True                  # the first trial: the recipe's own values (in range)
    study: str | None = None               # default: the recipe's name
    storage: str | None = None             # an SQLAlchemy URL; default: SQLite in the study dir
    # Low-fidelity knobs for the trials only (e.g. federation.clients_per_round: 2,
    # data.max_examples: 600); best.yaml is written without them.
    fidelity: dict[KeyPath, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _pruner_name(cls, data: Any) -> Any:
        """`pruner: NAME` for `pruner: {name: NAME}`."""
        if isinstance(data, dict) and isinstance(data.get("pruner"), str):
            return {**data, "pruner": {"name": data["pruner"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TuneSection:
        both = sorted(set(self.params) & set(self.fidelity))
        if both:
            raise ValueError(f"{both} are both searched (params) and fixed (fidelity)")
        if self.sampler == "grid":
            for key, param in self.params.items():
                try:
                    param.grid()
                except ValueError as exc:
                    raise ValueError(f"sampler grid: params.{key}: {exc}") from None
        if self.sampler == "cmaes" and any(p.type == "categorical" for p in self.params.values()):
            raise ValueError("sampler cmaes searches numbers only; use tpe with categorical params")
        return self

    @property
    def maximize(self) -> bool:
        if self.direction is not None:
            return self.direction == "maximize"
        return self.metric not in LOWER_IS_BETTER
