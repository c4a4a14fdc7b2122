"""Lossy codecs for adapter tensors on the wire: fp16/bf16 casts, blockwise int8, top-k + EF."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, get_args

import torch

from fedtune.errors import MessageError
from fedtune.transport.codec import TensorSpec, all_finite

Method = Literal["none", "fp16", "bf16", "int8", "topk"]
METHODS: tuple[str, ...] = get_args(Method)
# Wire names are "<original name>::<part>"; "::" cannot occur in a module path or parameter name.
SEP = "::"
INT8_MAX = 127
MAX_BLOCK_SIZE = 1 << 20
_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SHOWN_NAMES = 5


@dataclass(frozen=True)
class CompressionConfig:
    """How adapter tensors are compressed for the wire (both parties read it from the recipe).

    ``block_size``: int8 keeps one absmax scale per block of that many consecutive values of
    the flattened tensor. ``topk_ratio``: top-k keeps ``max(1, ceil(ratio * numel))``
    coordinates per tensor.
    """

    method: Method = "none"
    block_size: int = 64
    topk_ratio: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compression method {self.method!r} is not one of {list(METHODS)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}")
        ratio = self.topk_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"topk_ratio must be a number, got {type(ratio).__name__}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {ratio}")


# ---------------------------------------------------------------- sizes and names



def codec_of(section: Any) -> CompressionConfig:
    """The codec of a recipe's `federation.compression.up` or `.down` section."""
    return CompressionConfig(method=section.method, block_size=section.block_size,
                             topk_ratio=section.topk_ratio)


def topk_count(numel: int, ratio: float) -> int:
    """Coordinates top-k keeps: max(1, ceil(ratio * numel)), never more than numel.

    The product is taken in decimal so that e.g. 0.01 * 300 keeps 3, not 4.
    """
    return min(numel, max(1, math.ceil(Decimal(repr(float(ratio))) * numel)))


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def _check_local(name: Any, dtype: torch.dtype, config: CompressionConfig) -> None:
    """Our own tensors: names must not hold the separator; lossy methods need float tensors."""
    if not isinstance(name, str) or not name or SEP in name:
        raise ValueError(f"tensor name {name!r} must be a non-empty str without {SEP!r}")
    if config.method != "none" and not dtype.is_floating_point:
        raise ValueError(f"tensor '{name}' has dtype {dtype}; {config.method} needs float tensors")


def _tensor_wire_specs(
    name: str, spec: TensorSpec, config: CompressionConfig
) -> dict[str, TensorSpec]:
    numel = math.prod(spec.shape)
    if config.method == "none":
        return {name: TensorSpec(tuple(spec.shape), spec.dtype)}
    if config.method in _CAST_DTYPES:
        return {name: TensorSpec(tuple(spec.shape), _CAST_DTYPES[config.method])}
    if config.method == "int8":
        n_blocks = -(-numel // config.block_size)
        return {
            f"{name}{SEP}q": TensorSpec((n_blocks * config.block_size,), torch.int8),
            f"{name}{SEP}scale": TensorSpec((n_blocks,), torch.float32),
        }
    k = topk_count(numel, config.topk_ratio)
    return {
        f"{name}{SEP}idx": TensorSpec((k,), _index_dtype(numel)),
        f"{name}{SEP}val": TensorSpec((k,), spec.dtype),
    }


def wire_specs(specs: Mapping[str, TensorSpec], config: CompressionConfig) -> dict[str, TensorSpec]:
    """The exact wire tensors (names, shapes, dtypes) that ``compress`` makes for these originals."""
    out: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        _check_local(name, spec.dtype, config)
        out.update(_tensor_wire_specs(name, spec, config))
    return out


# ---------------------------------------------------------------- compress


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast, clamping to the target's finite range first (fp16 tops out at 65504, never inf)."""
    if torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        limit = torch.finfo(dtype).max
        tensor = tensor.clamp(-limit, limit)
    return tensor.to(dtype)


def _int8_encode(tensor: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = _cast(tensor.reshape(-1), torch.float32)
    n_blocks = -(-flat.numel() // block_size)
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
    blocks = blocks.reshape(n_blocks, block_size)
    scale = blocks.abs().amax(dim=1) / INT8_MAX if n_blocks else blocks.new_zeros(0)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / divisor[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(-1), scale


def _topk_encode(
    x: torch.Tensor, k: int, val_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted indices, kept values, residual = x - what the receiver will rebuild)."""
    flat = x.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    val = _cast(flat[idx], val_dtype)
    kept = torch.zeros_like(flat)
    kept[idx] = val.to(flat.dtype)
    return idx.to(_index_dtype(flat.numel())), val, (flat - kept).reshape(x.shape)


def compress(
    state: Mapping[str, torch.Tensor],
    config: CompressionConfig,
    *,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Turn float tensors into wire tensors; returns (wire, new residual).

    The residual is error-feedback memory for ``topk`` (Stich et al. 2018; Karimireddy et al.
    2019): ``x = state + residual`` is sparsified and the new residual is ``x`` minus what the
    receiver rebuilds. It is returned for topk (start with None) and must be None otherwise.
    Non-finite values raise MessageError, as the receiver would refuse them.
    """
    if config.method != "topk" and residual is not None:
        raise ValueError(f"a residual is only used by topk, not {config.method}")
    if residual is not None and set(residual) != set(state):
        raise ValueError("residual must have exactly the names of the state")
    wire: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] | None = {} if config.method == "topk" else None
    for name, tensor in state.items():
        _check_local(name, tensor.dtype, config)
        t = tensor.detach().cpu()
        if config.method == "none":
            wire[name] = t
            continue
        if not all_finite(t):
            raise MessageError(f"tensor '{name}' has non-finite values; it cannot be sent")
        if config.method in _CAST_DTYPES:
            wire[name] = _cast(t, _CAST_DTYPES[config.method])
        elif config.method == "int8":
            wire[f"{name}{SEP}q"], wire[f"{name}{SEP}scale"] = _int8_encode(t, config.block_size)
        else:
            work = torch.float64 if t.dtype == torch.float64 else torch.float32
            x = t.to(work)
            if residual is not None:
                if tuple(residual[name].shape) != tuple(t.shape):
                    raise ValueError(f"residual '{name}' has shape {tuple(residual[name].shape)}")
                x = x + residual[name].detach().cpu().to(work)
            k = topk_count(x.numel(), config.topk_ratio)
            idx, val, res = _topk_encode(x, k, t.dtype)
            wire[f"{name}{SEP}idx"], wire[f"{name}{SEP}val"] = idx, val
            assert new_residual is not None
            new_residual[name] = res
    return wire, new_residual


# ---------------------------------------------------------------- decompress (untrusted input)


def check_wire(wire: Any, expected: Mapping[str, TensorSpec], *, finite: bool = True) -> None:
    """Raise MessageError unless ``wire`` holds exactly the expected tensors (and, with
    ``finite``, only finite float values)."""
    if not isinstance(wire, Mapping):
        raise MessageError(f"wire tensors must be a dict, got {type(wire).__name__}")
    missing = sorted(set(expected) - set(wire))
    unexpected = sorted(map(str, set(wire) - set(expected)))
    if missing or unexpected:
        raise MessageError(
            f"wire tensor names differ; missing {missing[:_SHOWN_NAMES]}, "
            f"unexpected {unexpected[:_SHOWN_NAMES]}"
        )
    for name, spec in expected.items():
        tensor = wire[name]
        if not isinstance(tensor, torch.Tensor):
            raise MessageError(f"wire '{name}' is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
            raise MessageError(
                f"wire '{name}' is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(spec.shape)} {spec.dtype}"
            )
        if finite and tensor.dtype.is_floating_point and not all_finite(tensor):
            raise MessageError(f"wire '{name}' has non-finite values")


def _int8_decode(
    wire: Mapping[str, torch.Tensor], name: str, spec: TensorSpec, block_size: int
) -> torch.Tensor:
    q, scale = wire[f"{name}{SEP}q"].cpu(), wire[f"{name}{SEP}scale"].cpu()
    if bool((scale < 0).any()):
        raise MessageError(f"wire '{name}{SEP}scale' has negative scales")
    if bool((q < -INT8_MAX).any()):
        raise MessageError(f"wire '{name}{SEP}q' has -128, outside [-127, 127]")
    values = (q.reshape(-1, block_size).to(torch.float32) * scale[:, None]).reshape(-1)
    return values[: math.prod(spec.shape)].reshape(spec.shape)


def _topk_decode(wire: Mapping[str, torch.Tensor], name: str, spec: TensorSpec) -> torch.Tensor:
    idx, val = wire[f"{name}{SEP}idx"].cpu().to(torch.int64), wire[f"{name}{SEP}val"].cpu()
    numel = math.prod(spec.shape)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise MessageError(f"wire '{name}{SEP}idx' has indices outside [0, {numel})")
    if not bool((idx[1:] > idx[:-1]).all()):
        raise MessageError(f"wire '{name}{SEP}idx' is not strictly increasing (duplicate/unsorted)")
    flat = torch.zeros(numel, dtype=val.dtype)
    flat[idx] = val
    return flat.reshape(spec.shape)


def decompress(
    wire: Mapping[str, torch.Tensor],
    config: CompressionConfig,
    specs: Mapping[str, TensorSpec],
    *,
    finite_checked: bool = False,
) -> dict[str, torch.Tensor]:
    """Rebuild tensors with exactly the names, shapes and dtypes of ``specs``.

    ``wire`` is untrusted: wrong names, shapes or dtypes, bad indices or scales, non-finite
    values, and values that would overflow the original dtype raise MessageError.
    ``finite_checked``: every float of ``wire`` is known finite (codec.decode checked each one),
    so only a rebuild that can overflow (int8 scales, top-k values, a cast to a narrower float)
    is checked again: each value is checked once on the default path, not three times.
    """
    check_wire(wire, wire_specs(specs, config), finite=not finite_checked)
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if config.method in ("none", *_CAST_DTYPES):
            tensor = wire[name].cpu()
        elif config.method == "int8":
            tensor = _int8_decode(wire, name, spec, config.block_size)
        else:
            tensor = _topk_decode(wire, name, spec)
        source = tensor.dtype
        tensor = tensor.to(spec.dtype)
        if spec.dtype.is_floating_point and _may_overflow(config, source, spec.dtype) \
                and not all_finite(tensor):
            raise MessageError(f"tensor '{name}' overflows {spec.dtype} when rebuilt")
        out[name] = tensor
    return out


def _may_overflow(config: CompressionConfig, source: torch.dtype, target: torch.dtype) -> bool:
    """Whether rebuilding finite wire values can give a non-finite tensor: int8's products, or a
    cast to a float type of smaller range (a plain or widening cast of finite values cannot)."""
    if config.method in ("int8", "topk"):
        return True
    if not source.is_floating_point:
        return True
    return torch.finfo(target).max < torch.finfo(source).max
