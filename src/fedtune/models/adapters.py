"""Attach a peft adapter to the base model, and move its tensors in and out of the shared model."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_config, get_peft_model

from fedtune.config import AdapterSection
from fedtune.errors import ModelError

log = logging.getLogger("fedtune.models")

# Methods configured by the recipe's r / alpha / dropout / target_modules keys.
LORA_LIKE = {"lora": ("r", "lora_alpha", "lora_dropout")}


def build_peft_config(section: AdapterSection, model=None):
    """The peft config for `adapter.method`; `adapter.options` pass through to peft."""
    options = dict(section.options)
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


def _peft_knows(model) -> bool:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    return model.config.model_type in known


def attach_adapter(model, section: AdapterSection) -> PeftModel | torch.nn.Module:
    """Wrap the frozen base with a fresh adapter (its initial values depend on torch's seed).

    `full` trains every parameter and `bitfit` only the biases (Ben Zaken et al. 2022); both
    return the model itself, saved as a whole model directory at the end.
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
        return get_peft_model(model, config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"adapter: cannot apply {section.method!r} to this model: {exc}") from None


class AdapterSlot:
    """The trainable tensors of the one shared model, by parameter name.

    Simulated clients take turns: `set` copies a client's (or the global) adapter in, `get` copies
    it out as CPU tensors. The name -> parameter map is built once, so swaps are plain copies.
    Works for every peft method (and for full fine-tuning): what travels is what trains.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError("adapter: the model has no trainable parameters")

    def get(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.params.items()}

    @torch.no_grad()
    def set(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.params.keys():
            missing = sorted(self.params.keys() - state.keys())[:3]
            extra = sorted(state.keys() - self.params.keys())[:3]
            raise ModelError(f"adapter state does not match the model: missing {missing}, unexpected {extra}")
        for name, param in self.params.items():
            param.copy_(state[name])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())
