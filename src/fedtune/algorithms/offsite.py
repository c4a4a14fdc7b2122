"""Offsite-tuning (FederatedScope-LLM's): clients tune the first and last layers of an emulator, a
layer-dropped copy of the model the owner keeps; FedAvg of those layers; the server plugs them back
into the full model by depth. The emulator is built by the server process (runtime/setup.py with
models/offsite.py); this module holds the options and the server side, which is FedAvg.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedtune.algorithms.base import AlgorithmSpec, register
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig


class DistillConfig(BaseModel):
    """Optional alignment of the emulator with the full model on data the server holds."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(0, ge=0)
    lr: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(8, ge=1)
    lm_weight: float = Field(1.0, ge=0.0)
    kd_weight: float = Field(1.0, ge=0.0)
    # "synthetic": plain statements of the built-in benchmark's skills (a public corpus the server
    # holds); otherwise a data file in any format fedtune reads, used as plain text.
    data: str = "synthetic"
    examples: int = Field(2000, ge=1)


class OffsiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter_bottom: int = Field(1, ge=0)     # first layers that train
    adapter_top: int = Field(1, ge=0)        # last layers that train
    drop_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    weighting: Literal["examples", "uniform"] = "examples"


def check_recipe(config: OffsiteConfig, recipe) -> None:
    if config.adapter_bottom + config.adapter_top == 0:
        raise ValueError("federation.options: offsite needs adapter_bottom + adapter_top >= 1")
    if recipe.adapter.method != "full":
        raise ValueError("adapter.method: offsite trains whole adapter layers of the emulator; "
                         "set adapter.method=full (only those layers train)")


SPEC = register(AlgorithmSpec(
    name="offsite",
    summary="Offsite-tuning: clients tune the end layers of a layer-dropped emulator, the server plugs them into the full model.",
    config=OffsiteConfig,
    build=lambda config, n_clients: FedAvg(FedAvgConfig(weighting=config.weighting)),
    check=check_recipe,
    sum_only=True,
))
