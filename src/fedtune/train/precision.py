"""Mixed precision for the local step: which autocast dtype, and a gradient scaler for fp16.

A peft adapter's weights stay float32 whatever the base's dtype (models.adapters.attach_adapter)."""

from __future__ import annotations

import contextlib

import torch

from fedtune.errors import ModelError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most of the frozen floating-point weights have (the base model's)."""
    count: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else torch.float32


def resolve_precision(spec: str, device: torch.device, base: torch.dtype = torch.float32) -> str:
    """`train.precision` made concrete. `auto`: bf16 on a GPU with bf16, fp16 on an older GPU; on
    a CPU, the base's own half dtype if it has one, else fp32 (autocast buys little there).
    `fp32` with a half-precision base is refused: the base's matmuls cannot run in float32."""
    if spec == "fp32" and base in (torch.bfloat16, torch.float16):
        raise ModelError(
            f"train.precision fp32 needs a float32 base, but the base model is {base} "
            "(model.dtype); set train.precision auto (or bf16/fp16), or model.dtype float32"
        )
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(base, "fp32")


class Precision:
    """The autocast context and (for fp16) the gradient scaler of one trainer."""

    def __init__(self, spec: str, device: torch.device, base: torch.dtype = torch.float32):
        self.mode = resolve_precision(spec, device, base)
        self.device = device
        self.dtype = _DTYPES.get(self.mode)
        if self.dtype is not None and device.type not in ("cuda", "cpu"):
            raise ModelError(f"train.precision {self.mode} is not available on {device.type}")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler for one local run (fp16 only): scales the loss up so small
        gradients survive fp16, unscales before clipping, skips a step whose gradients overflowed."""
        if self.dtype is not torch.float16:
            return None
        return torch.amp.GradScaler(self.device.type)

