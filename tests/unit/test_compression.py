"""Tests for wire compression: error bounds, top-k error feedback, layouts, and untrusted input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.errors import MessageError
from fedtune.transport.codec import TensorSpec, check_message, decode, encode, specs_of
from fedtune.transport.compression import (
    METHODS,
    CompressionConfig,
    compress,
    decompress,
    topk_count,
    wire_specs,
)
from fedtune.wire import Message, MessageKind

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def round_trip(state: dict[str, torch.Tensor], config: CompressionConfig) -> dict:
    wire, _ = compress(state, config)
    return decompress(wire, config, specs_of(state))


def sample_state() -> dict[str, torch.Tensor]:
    return {
        "layer.0.lora_A.weight": randn(4, 9, seed=1),
        "layer.0.lora_B.weight": randn(9, 4, seed=2, dtype=torch.bfloat16),
        "layer.1.lora_A.weight": randn(3, 5, seed=3, dtype=torch.float16),
        "scalar": torch.tensor(0.75),
        "empty": torch.zeros(0, 3),
    }


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "zip"},
        {"block_size": 0},
        {"block_size": True},
        {"topk_ratio": 0.0},
        {"topk_ratio": 1.5},
        {"topk_ratio": "0.1"},
    ],
)
def test_config_rejects_bad_values(fields: dict) -> None:
    with pytest.raises(ValueError):
        CompressionConfig(**fields)


# ---------------------------------------------------------------- casts


@pytest.mark.parametrize(("method", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_relative_error_within_half_epsilon(method: str, dtype: torch.dtype) -> None:
    x = randn(64, 33, seed=4) * 10.0
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)  # stay in the normal range
    out = round_trip({"w": x}, CompressionConfig(method))["w"]
    assert out.dtype == torch.float32
    rel = ((out.double() - x.double()).abs() / x.double().abs()).max().item()
    assert 0 < rel <= torch.finfo(dtype).eps / 2


def test_fp16_clamps_out_of_range_values_instead_of_inf() -> None:
    x = torch.tensor([1e6, -1e6, 3.0, 70000.0])
    wire, _ = compress({"w": x}, CompressionConfig("fp16"))
    assert wire["w"].dtype == torch.float16
    assert wire["w"].tolist() == [65504.0, -65504.0, 3.0, 65504.0]


def test_bf16_clamps_near_float32_max() -> None:
    x = torch.tensor([torch.finfo(torch.float32).max, -3.4e38])
    out = round_trip({"w": x}, CompressionConfig("bf16"))["w"]
    assert bool(torch.isfinite(out).all())


# ---------------------------------------------------------------- int8


def test_int8_hand_example() -> None:
    config = CompressionConfig("int8", block_size=4)
    x = torch.tensor([0.5, -1.0, 0.25, 0.0])
    wire, residual = compress({"w": x}, config)
    assert residual is None
    assert wire["w::q"].dtype == torch.int8
    # 0.5 / (1/127) = 63.5 rounds half-to-even to 64; 31.75 rounds to 32.
    assert wire["w::q"].tolist() == [64, -127, 32, 0]
    assert wire["w::scale"].dtype == torch.float32
    assert wire["w::scale"].tolist() == [pytest.approx(1 / 127)]
    out = decompress(wire, config, specs_of({"w": x}))["w"]
    assert out.tolist() == pytest.approx([64 / 127, -1.0, 32 / 127, 0.0])
    assert (out - x).abs().max().item() <= (1 / 127) / 2 + 1e-7


@pytest.mark.parametrize(("shape", "block_size"), [((7, 13), 16), ((64, 64), 64), ((5,), 3)])
def test_int8_error_at_most_half_a_scale_per_block(shape: tuple, block_size: int) -> None:
    config = CompressionConfig("int8", block_size=block_size)
    x = randn(*shape, seed=5) * 3.0
    wire, _ = compress({"w": x}, config)
    n = x.numel()
    n_blocks = math.ceil(n / block_size)
    assert wire["w::q"].shape == (n_blocks * block_size,)
    assert wire["w::q"][n:].eq(0).all()  # padding encodes as zeros
    assert wire["w::q"].abs().max().item() == 127  # the absmax of each block maps to ±127
    out = decompress(wire, config, specs_of({"w": x}))["w"]
    per_value_scale = wire["w::scale"].repeat_interleave(block_size)[:n].reshape(shape)
    assert bool(((out - x).abs() <= per_value_scale / 2 * (1 + 1e-5)).all())


def test_int8_all_zero_tensor_has_zero_scales_and_exact_output() -> None:
    config = CompressionConfig("int8", block_size=8)
    x = torch.zeros(3, 7)
    wire, _ = compress({"w": x}, config)
    assert wire["w::scale"].tolist() == [0.0, 0.0, 0.0]
    assert wire["w::q"].eq(0).all()
    assert torch.equal(decompress(wire, config, specs_of({"w": x}))["w"], x)


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_shapes_and_dtypes_survive_including_0d_and_empty(method: str) -> None:
    config = CompressionConfig(method, block_size=8, topk_ratio=1.0)
    state = sample_state()
    out = round_trip(state, config)
    assert specs_of(out) == specs_of(state)
    assert out["scalar"].item() == pytest.approx(0.75, abs=0.75 / 254)
    if method == "topk":  # ratio 1.0 keeps everything
        assert all(torch.equal(out[name], state[name]) for name in state)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.01, 0.3, 1.0])
def test_wire_specs_match_what_compress_makes(method: str, ratio: float) -> None:
    config = CompressionConfig(method, block_size=5, topk_ratio=ratio)
    state = sample_state()
    wire, _ = compress(state, config)
    assert specs_of(wire) == wire_specs(specs_of(state), config)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_lossy_methods_refuse_int_tensors_and_separator_names(method: str) -> None:
    config = CompressionConfig(method)
    with pytest.raises(ValueError, match="float"):
        compress({"w": torch.arange(4)}, config)
    with pytest.raises(ValueError, match="::"):
        compress({"w::q": torch.ones(4)}, config)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_lossy_methods_refuse_non_finite_state(method: str) -> None:
    with pytest.raises(MessageError, match="non-finite"):
        compress({"w": torch.tensor([1.0, math.nan])}, CompressionConfig(method))


def test_none_passes_any_dtype_through() -> None:
    state = {"steps": torch.arange(3), "mask": torch.tensor([True, False])}
    out = round_trip(state, CompressionConfig())
    assert all(torch.equal(out[n], state[n]) for n in state)


# ---------------------------------------------------------------- top-k and error feedback


def test_topk_count() -> None:
    assert topk_count(300, 0.01) == 3  # not 4, though 0.01 * 300 > 3 in binary floats
    assert topk_count(4096, 0.01) == 41
    assert topk_count(10, 1e-6) == 1
    assert topk_count(1, 0.5) == 1
    assert topk_count(0, 0.5) == 0


def test_topk_keeps_exactly_the_k_largest_magnitudes() -> None:
    x = torch.randperm(50, generator=torch.Generator().manual_seed(6)).float() - 24.5
    config = CompressionConfig("topk", topk_ratio=0.1)
    wire, residual = compress({"w": x}, config)
    idx = wire["w::idx"]
    assert idx.dtype == torch.int32 and idx.tolist() == sorted(idx.tolist())
    expected = set(torch.topk(x.abs(), 5).indices.tolist())
    assert set(idx.tolist()) == expected
    out = decompress(wire, config, specs_of({"w": x}))["w"]
    kept = out != 0
    assert kept.sum().item() == 5
    assert torch.equal(out[kept], x[kept])
    assert torch.equal(residual["w"], torch.where(kept, torch.zeros_like(x), x))


def test_topk_residual_carries_what_was_dropped() -> None:
    config = CompressionConfig("topk", topk_ratio=0.25)
    state = {"a": randn(6, 4, seed=7), "b": randn(10, seed=8, dtype=torch.bfloat16)}
    first = {"a": randn(6, 4, seed=9), "b": randn(10, seed=10)}
    wire, residual = compress(state, config, residual=first)
    out = decompress(wire, config, specs_of(state))
    for name in state:
        total = state[name].float() + first[name]
        assert torch.allclose(out[name].float() + residual[name], total, atol=1e-6)


def test_error_feedback_sum_of_outputs_tracks_sum_of_inputs() -> None:
    v = {"w": torch.linspace(0.1, 1.6, 16)}
    config = CompressionConfig("topk", topk_ratio=1 / 16)  # one coordinate per round
    specs, rounds = specs_of(v), 400
    with_ef, without_ef = torch.zeros(16), torch.zeros(16)
    residual = None
    for _ in range(rounds):
        wire, residual = compress(v, config, residual=residual)
        with_ef += decompress(wire, config, specs)["w"]
        plain, _ = compress(v, config)
        without_ef += decompress(plain, config, specs)["w"]
    target = rounds * v["w"]
    assert torch.allclose(with_ef + residual["w"], target, rtol=1e-4)
    assert ((with_ef - target).norm() / target.norm()).item() < 0.05
    assert ((without_ef - target).norm() / target.norm()).item() > 0.5


def test_residual_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="only used by topk"):
        compress({"w": torch.ones(3)}, CompressionConfig("int8"), residual={"w": torch.ones(3)})
    topk = CompressionConfig("topk")
    with pytest.raises(ValueError, match="names"):
        compress({"w": torch.ones(3)}, topk, residual={"v": torch.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        compress({"w": torch.ones(3)}, topk, residual={"w": torch.ones(4)})


# ---------------------------------------------------------------- untrusted wire


def _topk_wire() -> tuple[dict, CompressionConfig, dict]:
    config = CompressionConfig("topk", topk_ratio=0.3)
    state = {"w": randn(10, seed=11)}
    wire, _ = compress(state, config)
    return wire, config, specs_of(state)


def _int8_wire() -> tuple[dict, CompressionConfig, dict]:
    config = CompressionConfig("int8", block_size=4)
    state = {"w": randn(2, 5, seed=12, dtype=torch.float16)}
    wire, _ = compress(state, config)
    return wire, config, specs_of(state)


def _set(wire: dict, name: str, value: object) -> dict:
    return {**wire, name: value}


BAD_WIRES = {
    "index out of range": (_topk_wire, lambda w: _set(w, "w::idx", torch.tensor([0, 5, 10], dtype=torch.int32))),
    "negative index": (_topk_wire, lambda w: _set(w, "w::idx", torch.tensor([-1, 2, 3], dtype=torch.int32))),
    "duplicate index": (_topk_wire, lambda w: _set(w, "w::idx", torch.tensor([2, 2, 3], dtype=torch.int32))),
    "unsorted index": (_topk_wire, lambda w: _set(w, "w::idx", torch.tensor([3, 2, 1], dtype=torch.int32))),
    "index dtype": (_topk_wire, lambda w: _set(w, "w::idx", w["w::idx"].long())),
    "value shape": (_topk_wire, lambda w: _set(w, "w::val", torch.ones(4))),
    "value nan": (_topk_wire, lambda w: _set(w, "w::val", torch.tensor([1.0, math.nan, 2.0]))),
    "missing name": (_topk_wire, lambda w: {"w::idx": w["w::idx"]}),
    "extra name": (_topk_wire, lambda w: _set(w, "x::val", torch.ones(3))),
    "not a tensor": (_topk_wire, lambda w: _set(w, "w::val", [1.0, 2.0, 3.0])),
    "not a dict": (_topk_wire, lambda w: list(w.values())),
    "nan scale": (_int8_wire, lambda w: _set(w, "w::scale", torch.tensor([0.1, math.nan, 0.1]))),
    "inf scale": (_int8_wire, lambda w: _set(w, "w::scale", torch.tensor([0.1, math.inf, 0.1]))),
    "negative scale": (_int8_wire, lambda w: _set(w, "w::scale", torch.tensor([0.1, -0.1, 0.1]))),
    "q of -128": (_int8_wire, lambda w: _set(w, "w::q", torch.full((12,), -128, dtype=torch.int8))),
    "q shape": (_int8_wire, lambda w: _set(w, "w::q", torch.zeros(10, dtype=torch.int8))),
    "scale dtype": (_int8_wire, lambda w: _set(w, "w::scale", w["w::scale"].double())),
    "overflows fp16": (_int8_wire, lambda w: _set(w, "w::scale", torch.full((3,), 1e30))),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_WIRES, ids=list(BAD_WIRES))
def test_decompress_rejects_bad_wire(case: str) -> None:
    make, corrupt = BAD_WIRES[case]
    wire, config, specs = make()
    decompress(wire, config, specs)  # the untouched wire is fine
    with pytest.raises(MessageError):
        decompress(corrupt(wire), config, specs)


@pytest.mark.parametrize("method", ["none", "fp16", "bf16"])
def test_decompress_rejects_wrong_shape_and_inf_for_plain_layouts(method: str) -> None:
    config = CompressionConfig(method)
    state = {"w": randn(3, 4, seed=13)}
    wire, _ = compress(state, config)
    specs = specs_of(state)
    with pytest.raises(MessageError, match="expected"):
        decompress({"w": wire["w"].reshape(4, 3)}, config, specs)
    bad = wire["w"].clone()
    bad[0, 0] = math.inf
    with pytest.raises(MessageError, match="non-finite"):
        decompress({"w": bad}, config, specs)


# ---------------------------------------------------------------- through the message codec


def _encoded_size(wire: dict[str, torch.Tensor], config: CompressionConfig) -> int:
    message = Message(
        MessageKind.UPDATE, 1, "client-0", "server", wire, {"n_examples": 1}
    )
    return len(encode(message))


def test_byte_savings_on_encoded_messages() -> None:
    state = {"w": randn(64, 64, seed=14)}
    sizes = {}
    for config in (
        CompressionConfig(),
        CompressionConfig("int8"),
        CompressionConfig("topk", topk_ratio=0.01),
    ):
        wire, _ = compress(state, config)
        sizes[config.method] = _encoded_size(wire, config)
    assert sizes["int8"] < 0.30 * sizes["none"]
    assert sizes["topk"] < 0.05 * sizes["none"]


@pytest.mark.parametrize("method", METHODS)
def test_receiver_checks_then_decompresses(method: str) -> None:
    sender_config = CompressionConfig(method, block_size=16, topk_ratio=0.2)
    state = sample_state()
    wire, _ = compress(state, sender_config)
    message = decode(
        encode(
            Message(
                MessageKind.FIT, 2, "server", "c1", wire, {"lr": 0.1}
            )
        )
    )
    config = sender_config  # both parties take it from the recipe
    specs = specs_of(state)
    check_message(message, kinds={MessageKind.FIT}, tensor_specs=wire_specs(specs, config))
    out = decompress(message.tensors, config, specs)
    assert specs_of(out) == specs


# ---------------------------------------------------------------- fuzz


WIRE_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]


def _random_tensor(spec: TensorSpec, seed: int, special: int, numel: int) -> torch.Tensor:
    """Random contents; ``special`` adds NaN/inf or full-range ints, else indices are plausible."""
    g = torch.Generator().manual_seed(seed)
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=g).bool()
    if spec.dtype.is_floating_point:
        t = (torch.randn(spec.shape, generator=g) * 10.0 ** (seed % 40 - 10)).to(spec.dtype)
        if special == 1 and t.numel():
            t.view(-1)[0] = (math.nan, math.inf, -math.inf)[seed % 3]
        return t
    if special == 1:
        info = torch.iinfo(spec.dtype)
        return torch.randint(info.min, info.max, spec.shape, generator=g).to(spec.dtype)
    if spec.dtype == torch.int8:
        return torch.randint(-127, 128, spec.shape, generator=g).to(spec.dtype)
    k = math.prod(spec.shape)
    if special == 2 and k <= numel and len(spec.shape) == 1:  # valid sorted indices
        return torch.randperm(numel, generator=g)[:k].sort().values.to(spec.dtype)
    return torch.randint(-2, numel + 2, spec.shape, generator=g).to(spec.dtype)


@st.composite
def wire_cases(draw: st.DrawFn) -> tuple:
    method = draw(st.sampled_from(METHODS))
    config = CompressionConfig(
        method,
        block_size=draw(st.integers(1, 6)),
        topk_ratio=draw(st.sampled_from([0.1, 0.5, 1.0])),
    )
    names = draw(
        st.lists(st.sampled_from(["a", "b.weight", "c"]), min_size=1, max_size=3, unique=True)
    )
    shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
    specs = {n: TensorSpec(draw(shapes), draw(st.sampled_from(FLOAT_DTYPES[:3]))) for n in names}
    wire = {}
    for name, spec in wire_specs(specs, config).items():
        if draw(st.integers(0, 29)) == 0:
            continue  # drop it
        if draw(st.integers(0, 9)) == 0:
            spec = TensorSpec(draw(shapes), draw(st.sampled_from(WIRE_DTYPES)))
        numel = math.prod(specs[name.split("::")[0]].shape)
        seed, special = draw(st.integers(0, 2**16)), draw(st.sampled_from([0, 1, 2, 2, 2]))
        wire[name] = _random_tensor(spec, seed, special, numel)
    if draw(st.integers(0, 9)) == 0:
        wire[draw(st.sampled_from(["a::q", "a::idx", "z", "b.weight::val"]))] = torch.ones(2)
    return wire, config, specs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire_cases())
def test_decompress_of_random_wire_raises_only_message_error(case: tuple) -> None:
    wire, config, specs = case
    try:
        out = decompress(wire, config, specs)
    except MessageError:
        return
    assert specs_of(out) == specs
    assert all(bool(torch.isfinite(t).all()) for t in out.values())
