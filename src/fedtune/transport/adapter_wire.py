"""How adapter tensors travel in one direction: compressed when sent, checked and rebuilt when received."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.transport.codec import TensorSpec
from fedtune.transport.compression import CompressionConfig, compress, decompress, wire_specs

State = dict[str, torch.Tensor]
RESIDUAL = "ef/"  # prefix of the error-feedback memory in a client's persistent state


class AdapterWire:
    def __init__(self, config: CompressionConfig, specs: Mapping[str, TensorSpec]):
        self.config = config
        self.specs = dict(specs)
        self.wire = wire_specs(self.specs, config)  # names, shapes, dtypes a receiver expects

    def pack(self, state: State, memory: State | None = None) -> State:
        """Wire tensors for `state`. With top-k, `memory` (a client's persistent state) keeps
        the error-feedback residual under `ef/<name>` and is updated in place."""
        if self.config.method != "topk" or memory is None:
            return compress(state, self.config)[0]
        residual = {k[len(RESIDUAL):]: v for k, v in memory.items() if k.startswith(RESIDUAL)} or None
        wire, new_residual = compress(state, self.config, residual=residual)
        for name, value in (new_residual or {}).items():
            memory[RESIDUAL + name] = value
        return wire

    def split(self, tensors: Mapping[str, torch.Tensor]) -> tuple[State, State]:
        """(the adapter's wire tensors, everything else) of a checked message."""
        wire = {k: v for k, v in tensors.items() if k in self.wire}
        return wire, {k: v for k, v in tensors.items() if k not in self.wire}

    def unpack(self, wire: State, *, finite_checked: bool = True) -> State:
        """The adapter tensors, rebuilt from checked wire tensors (MessageError if inconsistent).
        `finite_checked`: they came out of codec.decode, which refused any non-finite float."""
        return decompress(wire, self.config, self.specs, finite_checked=finite_checked)
