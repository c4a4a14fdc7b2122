"""The one finite-value check on received tensors catches a NaN or an infinity anywhere."""

from __future__ import annotations

import pytest
import torch

from fedtune.errors import MessageError
from fedtune.transport.codec import all_finite, decode, encode
from fedtune.wire import Message, MessageKind


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_value_anywhere_is_found(dtype, bad):
    for size in (1, 2, 7, 16, 33, 1000, 4099):
        for at in sorted({0, size // 2, size - 1, min(size - 1, 15)}):
            x = torch.linspace(-3, 3, size).to(dtype)
            assert all_finite(x)
            x[at] = bad
            assert not all_finite(x), (size, at)
            assert not all_finite(x.reshape(1, -1))


def test_largest_finite_values_pass_and_empty_tensors_are_finite():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        big = torch.finfo(dtype).max
        assert all_finite(torch.tensor([big, -big], dtype=dtype))
    assert all_finite(torch.empty(0))


def test_decode_refuses_a_nan_in_the_middle_of_a_large_tensor():
    x = torch.zeros(300_001)
    x[123_457] = float("nan")
    data = encode(Message(MessageKind.FIT, 1, "server", "c", tensors={"w": x}, meta={}))
    with pytest.raises(MessageError, match="non-finite"):
        decode(data)
