"""What the server expects in a client's reply: its exact tensors, hence the most bytes it can take.

The server knows, for every request it sends, the names, shapes and dtypes of the tensors the
answer must carry (`Server.run_round`: the upload wire specs and the strategy's extra tensors;
secure aggregation: the masked-input layout). From them follows the reply's size up to a small
header allowance, so a transport refuses anything larger at the first frame and a reply naming
other tensors as soon as its index arrives, before reading tensor bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedtune.transport.codec import (
    INDEX_PREFIX_BYTES,
    MAX_HEADER_BYTES,
    PREFIX_BYTES,
    TensorSpec,
)
from fedtune.wire import SECAGG_ANSWERS, MessageKind

# Codec prefix + the largest JSON header + safetensors' own length field and padding.
HEADER_ALLOWANCE = PREFIX_BYTES + MAX_HEADER_BYTES + INDEX_PREFIX_BYTES + 64
_INDEX_ENTRY = 96  # {"dtype":"BF16","shape":[],"data_offsets":[,]} with room for long offsets
_INDEX_DIM = 21  # one shape entry: up to 20 digits and a comma
ANSWERS = {MessageKind.FIT: MessageKind.UPDATE, MessageKind.EVALUATE: MessageKind.EVAL_RESULT,
           **SECAGG_ANSWERS}
# Kinds a client answers with tensors; every other answer (and ERROR) carries none.
TENSOR_ANSWERS = frozenset({MessageKind.UPDATE, MessageKind.SECAGG_MASKED})


@dataclass(frozen=True)
class Expectation:
    """The tensors one reply must carry; None when they are unknown (only the size limit applies)."""

    specs: Mapping[str, TensorSpec] | None = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(math.prod(s.shape) * _itemsize(s.dtype) for s in (self.specs or {}).values())

    @property
    def index_bytes(self) -> int:
        """An upper bound on the safetensors index (JSON) that describes exactly these tensors."""
        return 2 + sum(len(name.encode("utf-8")) * 6 + _INDEX_ENTRY + _INDEX_DIM * len(s.shape)
                       for name, s in (self.specs or {}).items())

    def max_bytes(self, ceiling: int) -> int:
        """The largest reply that can carry these tensors (at most `ceiling`)."""
        if self.specs is None:
            return ceiling
        return min(ceiling, HEADER_ALLOWANCE + self.index_bytes + self.data_bytes)


NO_TENSORS = Expectation({})
UNKNOWN = Expectation(None)


def default_expectation(kind: MessageKind) -> Expectation:
    """What an answer of `kind` may carry when the server has not said more."""
    return UNKNOWN if kind in TENSOR_ANSWERS else NO_TENSORS


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
