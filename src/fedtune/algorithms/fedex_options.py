"""FedEx's options (`federation.options` of `fedex`): the grid of local configurations, the step
size and the base algorithm with its own options; and its recipe check. No torch (the catalog's)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
OWN_KEYS = ("base", "grid", "eta", "schedule", "entropy_cutoff", "discount", "feedback", "seed")


class FedExConfig(BaseModel):
    """FedEx (Khodak et al. 2021): each client draws its local configuration from θ, a categorical
    distribution over `grid`'s configurations, which the server moves by exponentiated gradient on
    the clients' validation losses. Keys that are not FedEx's own are the base algorithm's options
    (`server_lr: 0.1` with `base: fedadam`), checked against it when the recipe loads."""

    model_config = ConfigDict(extra="allow")
    base: str = "fedavg"
    grid: dict[str, list[float]] = Field(..., min_length=1)
    eta: float | None = Field(None, gt=0, le=1e6)   # η₀; default √(2 ln K), K configurations
    schedule: Literal["auto", "adaptive", "aggressive", "constant"] = "auto"
    entropy_cutoff: float = Field(0.0, ge=0)        # θ's entropy below it: stop exploring
    discount: float = Field(0.0, ge=0, le=1)        # baseline: discounted mean of the rounds' losses
    feedback: Literal["difference", "after"] = "difference"   # L = after − before, or after
    seed: int = 0                                   # the draws: derive_seed(seed, round, client)

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
        """The options passed to the base algorithm (every key not FedEx's own)."""
        return dict(self.model_extra or {})

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

    if config.base not in BASES:
        raise ValueError(f"federation.options.base: FedEx wraps one of {', '.join(BASES)}; "
                         f"got {config.base!r}")
    try:
        algorithm_options(config.base, config.base_options())
    except RecipeError as exc:
        raise ValueError(f"{exc}; FedEx's own options: {', '.join(OWN_KEYS)}") from None
    if recipe.data.val_fraction <= 0:
        raise ValueError("data.val_fraction: FedEx needs each client's validation part to score "
                         "its configuration; set data.val_fraction > 0 (e.g. 0.05)")
    if "train.batch_size" in config.grid and recipe.train.dp_sgd is not None:
        raise ValueError("federation.options.grid.train.batch_size: DP-SGD's accounting assumes "
                         "one batch size; do not vary it with train.dp_sgd")
