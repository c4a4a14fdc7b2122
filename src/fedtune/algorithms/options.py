"""The options (`federation.options`) of every algorithm and their recipe checks, without torch.

A recipe is validated against these models when it loads, so this module imports only pydantic:
`fedtune recipes` or a recipe error must not pay for torch. The algorithm modules re-export their
model under the same name (e.g. `fedtune.algorithms.fedavg.FedAvgConfig`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Weighting = Literal["examples", "uniform"]


class FedAvgConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: Weighting = "examples"


class FedProxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0.0)
    weighting: Weighting = "examples"


class FedAvgMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weighting: Weighting = "examples"


class FedAdamConfig(BaseModel):
    """Options of FedAdam and FedYogi; `tau` is the paper's adaptivity ε."""

    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1e-2, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    weighting: Weighting = "examples"


class FedAdagradConfig(BaseModel):
    """Options of FedAdagrad (no beta2: the second moment is a plain running sum)."""

    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1e-2, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    weighting: Weighting = "examples"


class ScaffoldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    global_lr: float = Field(1.0, gt=0.0)
    weighting: Weighting = "examples"


class DPFedAvgConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_norm: float = Field(1.0, gt=0.0)
    noise_multiplier: float = Field(1.0, ge=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    noise_seed: int | None = None


class FlexLoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: Weighting = "examples"


class HetLoRAConfig(BaseModel):
    """HetLoRA: λ (`reg`) of the self-pruning regulariser on the last γ (`gamma`) of each client's
    rank components; `prune` lets a client drop them when their norm shrinks."""

    model_config = ConfigDict(extra="forbid")
    reg: float = Field(1e-3, ge=0.0)
    gamma: float = Field(0.25, gt=0.0, lt=1.0)
    prune: bool = True
    weighting: Literal["norm", "examples", "uniform"] = "norm"


class FedSPDistillConfig(BaseModel):
    """The auxiliary model's alignment with the full model (hidden-state matching) on text the
    server holds: "synthetic" (statements of the built-in benchmark's skills) or a data file."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(50, ge=0)
    lr: float = Field(5e-4, gt=0.0)
    batch_size: int = Field(8, ge=1)
    data: str = "synthetic"
    examples: int = Field(1000, ge=1)


class FedSPConfig(BaseModel):
    """FedSP: `shared_blocks` distinct blocks repeated to the full depth make the auxiliary model;
    the server tunes the averaged prompts `server_steps` steps (at `server_lr`, default train.lr)
    between rounds on its own shard `server_data` ("synthetic": the built-in benchmark's tasks
    drawn with the server's seed, `server_examples` per category; or a data file, that many)."""

    model_config = ConfigDict(extra="forbid")
    shared_blocks: int = Field(1, ge=1)
    distill: FedSPDistillConfig = Field(default_factory=FedSPDistillConfig)
    server_steps: int = Field(5, ge=0)
    server_lr: float | None = Field(None, gt=0.0)
    server_data: str = "synthetic"
    server_examples: int = Field(20, ge=1)
    weighting: Weighting = "examples"


def check_fedsp(config: FedSPConfig, recipe: Any) -> None:
    """FedSP's messengers are prefix prompts in every attention layer of both models."""
    if recipe.adapter.method != "prefix_tuning":
        raise ValueError("adapter.method: fedsp exchanges prefix soft prompts; set "
                         f"adapter.method=prefix_tuning (got {recipe.adapter.method!r})")


class FLoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: Weighting = "examples"


def check_mixed_ranks(config: BaseModel, recipe: Any) -> None:
    """An algorithm for heterogeneous ranks needs LoRA (`adapter.rank_per_client` is optional)."""
    if recipe.adapter.method != "lora":
        raise ValueError(f"adapter.method: {recipe.federation.algorithm} aggregates LoRA factors; "
                         f"set adapter.method=lora (got {recipe.adapter.method!r})")


class MedianConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrimmedMeanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trim_ratio: float = Field(0.1, ge=0, lt=0.5)


class KrumConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    byzantine: int = Field(1, ge=0)
    multi: int = Field(1, ge=1)
    weighting: Weighting = "uniform"


class NormBoundingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_norm: float = Field(gt=0)
    weighting: Weighting = "examples"


class FedMeZOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-3, gt=0.0)
    alpha: float = Field(0.0, ge=0.0)
    signal: Literal["loss", "loss_mean5", "update"] = "loss"
    weighting: Weighting = "examples"


class FedKSeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_seeds: int = Field(4096, ge=1, le=1 << 20)     # K
    eps: float = Field(5e-4, gt=0.0)
    pool_seed: int = Field(0, ge=0)                     # the K candidates derive from it
    pro: bool = False                                   # FedKSeed-Pro's seed sampling
    pro_clip: float = Field(1000.0, gt=0.0)
    loss_diff_clip: float | None = Field(None, gt=0.0)  # skip a step when |L+ − L−| exceeds it
    weighting: Weighting = "examples"


def check_zeroth_order(config: BaseModel, recipe: Any) -> None:
    """What a zeroth-order algorithm (fedmezo, fedkseed) needs: no backprop, so no DP-SGD."""
    if recipe.train.dp_sgd is not None:
        raise ValueError(
            f"train.dp_sgd privatises backprop gradients; federation.algorithm "
            f"{recipe.federation.algorithm!r} trains by zeroth-order steps (remove train.dp_sgd)")


def check_fedkseed(config: FedKSeedConfig, recipe: Any) -> None:
    """What FedKSeed needs from the rest of the recipe (ValueError naming the key)."""
    check_zeroth_order(config, recipe)
    if recipe.train.weight_decay:
        raise ValueError("train.weight_decay: fedkseed needs 0 (its model is rebuilt as θ0 − Σ G_k·z_k, "
                         "which holds only for plain steps)")
    fed = recipe.federation
    for direction in ("up", "down"):
        codec = getattr(fed.compression, direction)
        if codec.method != "none":
            raise ValueError(f"federation.compression.{direction}: fedkseed sends K scalars, not adapter "
                             "tensors; compression does not apply (use none)")
    if fed.secure_aggregation.enabled and config.pro:
        raise ValueError("federation.secure_aggregation.enabled: FedKSeed-Pro (options.pro) learns its "
                         "seed probabilities from each client's own scalars, which secure aggregation "
                         "hides; use pro: false (plain FedKSeed needs only their sum)")


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
    weighting: Weighting = "examples"


def check_offsite(config: OffsiteConfig, recipe: Any) -> None:
    """What offsite-tuning needs from the rest of the recipe (ValueError naming the key)."""
    if config.adapter_bottom + config.adapter_top == 0:
        raise ValueError("federation.options: offsite needs adapter_bottom + adapter_top >= 1")
    if recipe.adapter.method != "full":
        raise ValueError("adapter.method: offsite trains whole adapter layers of the emulator; "
                         "set adapter.method=full (only those layers train)")


# -- personalised FL (docs/algorithms.md, "Personalised FL") ---------------------------------

class FedAvgFTConfig(BaseModel):
    """FedAvg + FT: each client fine-tunes (a copy of) the global adapter before it evaluates."""

    model_config = ConfigDict(extra="forbid")
    ft_steps: int = Field(5, ge=1)
    ft_lr: float | None = Field(None, gt=0.0)          # None: train.lr
    weighting: Weighting = "examples"


class DittoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(0.1, ge=0.0)                     # λ of the proximal pull towards w
    personal_steps: int | None = Field(None, ge=1)      # None: the recipe's local budget
    personal_lr: float | None = Field(None, gt=0.0)     # None: the round's learning rate
    weighting: Weighting = "examples"


class FedRepConfig(BaseModel):
    """Personal part: tensors whose name contains one of `personal`, else the adapter tensors of
    the top `top_layers` layers."""

    model_config = ConfigDict(extra="forbid")
    personal: list[str] = Field(default_factory=list)
    top_layers: int = Field(1, ge=1)
    personal_steps: int | None = Field(None, ge=1)      # τ_h; None: the recipe's local budget
    weighting: Weighting = "examples"


class LoraSplitConfig(BaseModel):
    """FedSA-LoRA (share A, keep B) and FFA-LoRA (freeze A, share B)."""

    model_config = ConfigDict(extra="forbid")
    weighting: Weighting = "examples"


class PFedMeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(15.0, gt=0.0)                    # λ of the Moreau envelope
    inner_steps: int = Field(5, ge=1)                   # K steps to approximate θ per batch
    personal_lr: float | None = Field(None, gt=0.0)     # for θ; None: the round's learning rate
    beta: float = Field(1.0, gt=0.0)                    # server: w ← w + β·mean(w_i − w)
    weighting: Weighting = "examples"


def check_lora_split(config: BaseModel, recipe: Any) -> None:
    """FedSA-LoRA and FFA-LoRA split LoRA's A and B factors: they need a LoRA adapter."""
    if recipe.adapter.method not in ("lora", "qlora"):
        raise ValueError(f"adapter.method: {recipe.federation.algorithm} shares or freezes LoRA's "
                         f"A / B factors; use lora or qlora (got {recipe.adapter.method!r})")


class PFedGateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(0.5, gt=0.0, le=1.0)      # s: the share of the adapter a client keeps
    gate_lr: float = Field(0.1, gt=0.0)               # the gating layer's learning rate (SGD)
    weighting: Weighting = "examples"


def check_pfedgate(config: PFedGateConfig, recipe: Any) -> None:
    """pFedGate gates LoRA modules, and trains them through a functional call that swaps in the
    gated B tensors: Opacus computes no per-example gradient for those, so no DP-SGD."""
    check_lora_split(config, recipe)
    if recipe.train.dp_sgd is not None:
        raise ValueError("train.dp_sgd: pfedgate trains each LoRA B scaled by its gate (a functional "
                         "call), whose per-example gradients DP-SGD cannot compute; remove train.dp_sgd")
