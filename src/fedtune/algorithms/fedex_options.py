"""FedEx's options (`federation.options` of `fedex`): the grid of local configurations, the step
size and the base algorithm with its own options; and its recipe check. No torch (the catalog's)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Server-side algorithms FedEx can wrap: plain local training (or FedProx's) on the adapter, the
# global model as it is, a strategy that needs nothing but the options.
BASES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median",
         "trimmed_mean", "krum", "norm_bounding")
# The local hyper-parameters a grid may vary: key -> (integer?, low, high); low excluded for lr.
GRID_KEYS: dict[str, tuple[bool, float, float]] = {
    "train.lr": (False, 0.0, 100.0),        # as train.lr: > 0, <= 100 (what a client accepts)
    "train.local_steps": (True, 1, 100_000),
    "train.weight_decay": (False, 0.0, 1e6),
    "train.batch_size": (True, 1, 1_000_000),
}
MAX_CONFIGS = 1000
# Every option of the bases (tests check it against their options models): set beside FedEx's own,
# each checked against the chosen base; one left out takes the base's default.
BASE_KEYS = ("weighting", "mu", "server_lr", "momentum", "beta1", "beta2", "tau", "trim_ratio",
             "byzantine", "multi", "max_norm")
DEFAULT_GRID = {"train.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}


class FedExConfig(BaseModel):
    """FedEx (Khodak et al. 2021): each client draws its local configuration from θ, a categorical
    distribution over `grid`'s configurations, which the server moves by exponentiated gradient on
    the clients' validation losses. The base algorithm's options sit beside FedEx's own
    (`server_lr: 0.1` with `base: fedadam`), each checked against that base."""

    model_config = ConfigDict(extra="forbid")
    base: str = "fedavg"
    grid: dict[str, list[float]] = Field(default_factory=lambda: dict(DEFAULT_GRID), min_length=1)
    eta: float | None = Field(None, gt=0, le=1e6)   # η₀; default √(2 ln K), K configurations
    schedule: Literal["auto", "adaptive", "aggressive", "constant"] = "auto"
    entropy_cutoff: float = Field(0.0, ge=0)        # θ's entropy below it: stop exploring
    discount: float = Field(0.0, ge=0, le=1)        # baseline: discounted mean of the rounds' losses
    feedback: Literal["difference", "after"] = "difference"   # L = after − before, or after
    seed: int = 0                                   # the draws: derive_seed(seed, round, client)
    # the base's options (None: the base's default)
    weighting: Any = None
    mu: Any = None
    server_lr: Any = None
    momentum: Any = None
    beta1: Any = None
    beta2: Any = None
    tau: Any = None
    trim_ratio: Any = None
    byzantine: Any = None
    multi: Any = None
    max_norm: Any = None

    @field_validator("base")
    @classmethod
    def _check_base(cls, base: str) -> str:
        if base not in BASES:
            raise ValueError(f"FedEx wraps one of {', '.join(BASES)}; got {base!r}")
        return base

    @field_validator(*BASE_KEYS)
    @classmethod
    def _check_base_option(cls, value: Any, info: ValidationInfo) -> Any:
        """An option of the base: one its options model has, with a value it accepts."""
        base = info.data.get("base")
        if value is None or base is None:
            return value
        from fedtune.algorithms.catalog import CATALOG  # the catalog imports this module

        fields = CATALOG[base].config.model_fields
        name = info.field_name
        if name not in fields:
            raise ValueError(f"not an option of base {base} (its options: {', '.join(fields) or 'none'})")
        try:
            return TypeAdapter(Annotated[fields[name].annotation, fields[name]]).validate_python(value)
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"] for e in exc.errors())) from None

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: dict[str, list[float]]) -> dict[str, list[float]]:
        for key, values in grid.items():
            if key not in GRID_KEYS:
                raise ValueError(f"grid.{key}: not a key FedEx can vary; allowed: {', '.join(GRID_KEYS)}")
            integer, low, high = GRID_KEYS[key]
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
            for v in values:
                if not math.isfinite(v) or v < low or v > high or (key == "train.lr" and v <= 0):
                    bound = "(0" if key == "train.lr" else f"[{low:g}"
                    raise ValueError(f"grid.{key}: {v} is outside {bound}, {high:g}]")
                if integer and v != int(v):
                    raise ValueError(f"grid.{key}: {v} is not a whole number")
            if len(set(values)) != len(values):
                raise ValueError(f"grid.{key}: a value is listed twice")
        return {k: [int(v) if GRID_KEYS[k][0] else float(v) for v in vs] for k, vs in grid.items()}

    @model_validator(mode="after")
    def _check_size(self) -> FedExConfig:
        n = math.prod(len(v) for v in self.grid.values())
        if n < 2:
            raise ValueError("grid: FedEx chooses among configurations; give at least two")
        if n > MAX_CONFIGS:
            raise ValueError(f"grid: {n} configurations, more than {MAX_CONFIGS}")
        return self

    def base_options(self) -> dict[str, Any]:
        """The options passed to the base algorithm (those set)."""
        return {k: getattr(self, k) for k in BASE_KEYS if getattr(self, k) is not None}

    def configurations(self) -> list[dict[str, float | int]]:
        """The grid's configurations, the first key varying slowest (index j is θ's j-th entry)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def digest(self) -> str:
        """A short fingerprint of the configurations: a client whose recipe has another grid refuses."""
        text = json.dumps(self.configurations(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def eta0(self) -> float:
        """η₀: the option, or √(2 ln K) (FedEx's default)."""
        return self.eta if self.eta is not None else math.sqrt(2.0 * math.log(len(self.configurations())))


def check_fedex(config: FedExConfig, recipe: Any) -> None:
    """The base is one FedEx can wrap, its options fit it, each client has a validation part."""
    from fedtune.algorithms.catalog import algorithm_options  # the catalog imports this module
    from fedtune.errors import RecipeError

    try:   # what one option alone cannot say (norm_bounding's max_norm is required)
        algorithm_options(config.base, config.base_options())
    except RecipeError as exc:
        raise ValueError(f"{exc}, with federation.options.base {config.base}") from None
    if recipe.data.val_fraction <= 0:
        raise ValueError("data.val_fraction: FedEx needs each client's validation part to score "
                         "its configuration; set data.val_fraction > 0 (e.g. 0.05)")
    if "train.batch_size" in config.grid and recipe.train.dp_sgd is not None:
        raise ValueError("federation.options.grid.train.batch_size: DP-SGD's accounting assumes "
                         "one batch size; do not vary it with train.dp_sgd")
