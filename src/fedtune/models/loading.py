"""Load the base causal LM and its tokenizer (built-in, local path or hub id) on a sensible device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedtune.config import ModelSection
from fedtune.errors import ModelError
from fedtune.models.hub import BUILTIN_MODELS, OFFLINE_HINT, hub_access, resolve_model_path

__all__ = ["BUILTIN_MODELS", "hub_access", "load_base_model", "load_tokenizer", "resolve_model_path"]

log = logging.getLogger("fedtune.models")


def pick_device(spec: str) -> torch.device:
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        from fedtune.train.distributed import ranks

        launch = ranks()  # torchrun / accelerate launch: each rank on its own GPU
        return launch.device if launch is not None else torch.device("cuda")
    if spec == "auto":
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {spec!r} but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(spec)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that support it, else float16 (with `auto`)."""
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(section: ModelSection, hub: dict[str, Any] | None = None):
    path = resolve_model_path(section.name)
    hub = hub_access(section) if hub is None else hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=section.revision, trust_remote_code=section.trust_remote_code, **hub
        )
    except Exception as exc:  # transformers raises many types for a missing / unreachable model
        raise ModelError(_load_hint(section.name, path, "tokenizer", exc)) from None
    return finish_tokenizer(tokenizer, f"model.name {section.name!r}")


def finish_tokenizer(tokenizer, where: str):
    """Give the tokenizer a pad token (EOS, else UNK); refuse one without EOS."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token else tokenizer.unk_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{where}: the tokenizer has no EOS token; set one")
    return tokenizer


def load_base_model(section: ModelSection) -> tuple[PreTrainedModel, object]:
    """The frozen base model on its device, and its tokenizer (with a pad token)."""
    path = resolve_model_path(section.name)
    device = pick_device(section.device)
    dtype = pick_dtype(section.dtype, device)
    hub = hub_access(section)
    tokenizer = load_tokenizer(section, hub)
    extra: dict[str, Any] = dict(hub)
    if section.quantization != "none":
        extra.update(quantization_config=quantization_config(section.quantization, device, dtype),
                     device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=section.revision, dtype=dtype,
            trust_remote_code=section.trust_remote_code, **extra,
        )
    except Exception as exc:
        raise ModelError(_load_hint(section.name, path, "model", exc)) from None
    if section.quantization == "none":
        model.to(device)
    model.requires_grad_(False)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info("loaded %s (%s, %s)", section.name, device, dtype)
    return model, tokenizer


def quantization_config(kind: str, device: torch.device, dtype: torch.dtype):
    """bitsandbytes settings for a 4-bit (NF4, double quantisation; QLoRA) or 8-bit base."""
    if device.type != "cuda":
        raise ModelError(
            f"model.quantization {kind!r} (QLoRA) needs a CUDA GPU; this process runs on "
            f"{device.type}. Use adapter.method lora with model.quantization none."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"model.quantization {kind!r} (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
    )


def _load_hint(name: str, path: str, what: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(path).exists():
        return f"model.name {name!r}: cannot load the {what} from {path}: {first}"
    return (
        f"model.name {name!r}: cannot load the {what} ({first}). It is not a local directory; as a "
        f"hub id it needs network access or a cached copy (HF_HOME). {OFFLINE_HINT}"
    )
