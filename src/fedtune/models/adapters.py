"""Attach a peft adapter to the base model, and move its tensors in and out of the shared model."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_config, get_peft_model
from safetensors.torch import load_file, save_file

from fedtune.config import AdapterSection
from fedtune.errors import ModelError
from fedtune.models.adapter_methods import (
    DEFAULT_ADAPTER_LEN,
    DEFAULT_VIRTUAL_TOKENS,
    PROMPT_METHODS,
    check_method,
)
from fedtune.models.zero3 import assign_partition, gather_zero3, is_zero3, whole_numel, zero3_steps

log = logging.getLogger("fedtune.models")

# Methods configured by the recipe's r / alpha / dropout / target_modules keys.
LORA_LIKE = {"lora": ("r", "lora_alpha", "lora_dropout")}


def build_peft_config(section: AdapterSection, model=None):
    """The peft config for `adapter.method`; `adapter.options` pass through to peft.

    Methods peft cannot build without some option get fedtune's documented default for it
    (`default_options`); what the recipe gives always wins.
    """
    try:
        check_method(section.method, section.options)
    except ValueError as exc:
        raise ModelError(f"adapter.method: {exc}") from None
    options = {**default_options(section.method, model), **section.options}
    try:
        if section.method in ("lora", "qlora"):
            target = None if section.target_modules == "auto" else section.target_modules
            if target is None and model is not None and not _peft_knows(model):
                log.info("no default LoRA target modules for %s; using all-linear",
                         model.config.model_type)
                target = "all-linear"
            return LoraConfig(
                task_type="CAUSAL_LM", r=section.r, lora_alpha=section.alpha,
                lora_dropout=section.dropout, target_modules=target, **options,
            )
        return get_peft_config({"peft_type": section.method.upper(), "task_type": "CAUSAL_LM", **options})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"adapter.options for {section.method!r}: {exc}") from None


def default_options(method: str, model=None) -> dict:
    """fedtune's defaults for options a method has no usable default for in peft (docs/algorithms.md)."""
    if method in PROMPT_METHODS:
        return {"num_virtual_tokens": DEFAULT_VIRTUAL_TOKENS}
    if method == "adaption_prompt" and model is not None:
        layers = getattr(model.config, "num_hidden_layers", None)
        return {"adapter_len": DEFAULT_ADAPTER_LEN, **({"adapter_layers": layers} if layers else {})}
    if method in ("c3a", "vblora") and model is not None:
        # c3a's block_size / vblora's vector_length must divide the sizes of the layers they
        # adapt (peft: 256 for both); the largest divisor of every linear layer's sizes, at most 256.
        size = _common_linear_divisor(model, cap=256)
        return {"block_size": size} if method == "c3a" else {"vector_length": size}
    return {}


def _common_linear_divisor(model, cap: int) -> int:
    sizes = [s for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not name.endswith("lm_head") for s in (m.in_features, m.out_features)]
    divisor = math.gcd(*sizes) if sizes else cap
    return max(d for d in range(1, min(divisor, cap) + 1) if divisor % d == 0)


def _peft_knows(model) -> bool:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    return model.config.model_type in known


def attach_adapter(model, section: AdapterSection) -> PeftModel | torch.nn.Module:
    """Wrap the frozen base with a fresh adapter (its initial values depend on torch's seed).

    `full` trains every parameter and `bitfit` only the biases (Ben Zaken et al. 2022); both
    return the model itself; `save_adapter` saves a whole model for `full`, the biases for `bitfit`.
    """
    if section.method == "full":
        return model.requires_grad_(True)
    if section.method == "bitfit":
        biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        if not biases:
            raise ModelError(
                f"adapter.method 'bitfit' trains bias terms, but this model "
                f"({model.config.model_type}) has none; use a model with biases (GPT-2, OPT, ...)"
            )
        for p in biases:
            p.requires_grad_(True)
        return model
    if section.method == "qlora" or getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = build_peft_config(section, model)
    try:
        # peft keeps the adapter's weights in float32 on a bf16/fp16 base (autocast_adapter_dtype),
        # as QLoRA practice does: small updates are not lost to rounding, and what travels stays
        # float32. `full` and `bitfit` train the base's own weights, in the base's dtype.
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    except (TypeError, ValueError, KeyError, AttributeError, ImportError) as exc:
        raise ModelError(f"adapter: cannot apply {section.method!r} to this model: {exc}") from None
    return wrapped


# ---------------------------------------------------------------------------------------------
# Saving and loading what trained

BITFIT_FILE = "bitfit.safetensors"
BITFIT_CONFIG = "bitfit_config.json"


def save_adapter(model, section: AdapterSection, directory: str | Path,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Save what trained: a PEFT directory, BitFit's bias tensors only, or a whole model (`full`).
    `state`: the whole trainable tensors by parameter name, for a sharded model (whose own
    parameters hold one rank's rows each; AdapterSlot.get of its slot)."""
    directory = Path(directory)
    if state is not None and section.method == "lora":
        model.save_pretrained(directory, state_dict=state)
        return
    if section.method != "bitfit":
        model.save_pretrained(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    biases = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
              if p.requires_grad}
    save_file(biases, str(directory / BITFIT_FILE), metadata={"format": "pt"})
    base = getattr(model.config, "_name_or_path", "") or ""
    (directory / BITFIT_CONFIG).write_text(json.dumps(
        {"method": "bitfit", "base_model": base, "tensors": len(biases)}, indent=2) + "\n")


def is_bitfit_dir(directory: str | Path) -> bool:
    return (Path(directory) / BITFIT_FILE).is_file()


@torch.no_grad()
def apply_bitfit(model, directory: str | Path):
    """Copy the bias tensors saved by `save_adapter` into `model` (the base it was trained on)."""
    path = Path(directory) / BITFIT_FILE
    try:
        biases = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ModelError(f"{path}: not a readable BitFit file ({exc})") from None
    params = dict(model.named_parameters())
    unknown = sorted(set(biases) - set(params))[:3]
    if unknown:
        raise ModelError(f"{path}: tensors {unknown} are not parameters of this base model; "
                         "load the BitFit biases into the model they were trained on")
    for name, tensor in biases.items():
        if params[name].shape != tensor.shape:
            raise ModelError(f"{path}: {name} has shape {tuple(tensor.shape)}, the base model's "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(tensor.to(params[name].dtype))
    return model


class AdapterSlot:
    """The trainable tensors of the one shared model, by parameter name.

    Simulated clients take turns: `set` copies a client's (or the global) adapter in, `get` copies
    it out as CPU tensors. The name -> parameter map is built once, so swaps are plain copies.
    Works for every peft method (and for full fine-tuning): what travels is what trains.

    Sharded (train.sharding: fsdp, each parameter a DTensor holding this rank's rows): `set`
    copies each rank's rows of the whole tensors it is given (every rank is given the same), and
    keeps the whole tensors as a mirror; `get` answers from the mirror while the shards are
    unchanged since, and gathers the whole tensors (a collective: every rank must call it, as
    they do after training in step) once they changed. So rank 0 alone may set and get the
    adapter it was given (saving the final adapter) without the other ranks.
    DeepSpeed ZeRO-3 (train.sharding: deepspeed, each parameter holding 1/N of its elements in
    `ds_tensor`) works the same way: `set` writes each rank's partition, `get` gathers once the
    engine has stepped since.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError("adapter: the model has no trainable parameters")
        self.sharded = any(_is_shard(p) for p in self.params.values())
        self.zero3 = any(is_zero3(p) for p in self.params.values())
        self._mirror: dict[str, torch.Tensor] = {}
        self._versions: tuple[int, ...] = ()
        if self.sharded:  # built on every rank at the same point (Setup)
            self._remember(_gather(self.params))

    def _resharded(self) -> None:
        """Put every FSDP unit back in its sharded state: after a forward pass without backward
        (evaluation), FSDP leaves the root unit's weights gathered, and a copy into the shards
        would not reach them."""
        reshard(self.model)

    def _shard_versions(self) -> tuple[int, ...]:
        """The parameters' in-place version counters: the optimizer's step moves them, a
        forward pass (FSDP's gathers included) does not. ZeRO-3 steps its partitions behind
        the parameters' backs: there, the engine's count of optimizer steps."""
        if self.zero3:
            return (zero3_steps(self.model),)
        return tuple(p._version for p in self.params.values())

    def _remember(self, state: dict[str, torch.Tensor]) -> None:
        self._mirror = {n: t.detach().to("cpu", self.params[n].dtype, copy=True).contiguous()
                        for n, t in state.items()}
        self._versions = self._shard_versions()

    def get(self) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.params.items()}
        self._resharded()
        if self._shard_versions() != self._versions:  # trained since: gather (every rank)
            self._remember(_gather(self.params))
        return {n: t.clone() for n, t in self._mirror.items()}

    @torch.no_grad()
    def set(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.params.keys():
            missing = sorted(self.params.keys() - state.keys())[:3]
            extra = sorted(state.keys() - self.params.keys())[:3]
            raise ModelError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
        if not self.sharded:
            for name, param in self.params.items():
                param.copy_(state[name])
            return
        self._resharded()
        for name, param in self.params.items():
            _assign(param, state[name])
        self._remember(state)

    @torch.no_grad()
    def overlay(self, state: dict[str, torch.Tensor]) -> None:
        """Copy some of the tensors in (a client's personal part over the global model)."""
        unknown = sorted(state.keys() - self.params.keys())[:3]
        if unknown:
            raise ModelError(f"adapter state does not match the model: unexpected {unknown}")
        if not self.sharded:
            for name, tensor in state.items():
                self.params[name].copy_(tensor)
            return
        whole = self.get()
        for name, tensor in state.items():
            _assign(self.params[name], tensor)
        self._remember({**whole, **state})

    def num_parameters(self) -> int:
        return sum(whole_numel(p) for p in self.params.values())

    def num_bytes(self) -> int:
        return sum(whole_numel(p) * p.element_size() for p in self.params.values())


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP unit of `model` in its sharded state (frees gathered weights; no collective)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _is_shard(param: torch.Tensor) -> bool:
    """Whether a parameter is an FSDP shard (a DTensor holding this rank's rows) or a ZeRO-3
    partition."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or is_zero3(param)


def _gather(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded parameters gathered whole from every rank (a collective)."""
    if any(is_zero3(p) for p in params.values()):
        return gather_zero3(params)
    return {n: _whole(p) for n, p in params.items()}


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A sharded parameter gathered whole from every rank (a collective)."""
    return param.detach().full_tensor()


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter; into a sharded one, this rank's rows of it (ZeRO-3:
    this rank's partition of its flattened elements)."""
    if is_zero3(param):
        assign_partition(param, value)
        return
    if not _is_shard(param):
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    local = param.to_local()
    if tuple(value.shape) != tuple(param.shape):
        raise ModelError(f"adapter tensor of shape {tuple(value.shape)} for a parameter of shape "
                         f"{tuple(param.shape)}")
    whole = value.detach().to(device=local.device, dtype=local.dtype)
    local.copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                  src_data_rank=None).to_local())
