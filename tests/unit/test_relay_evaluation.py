"""The server's evaluation relayed to the other ranks under FSDP (runtime/relay.py): what rank 0
sends is what the other ranks evaluate; damaged bytes are refused, never evaluated."""

from __future__ import annotations

import pytest
import torch

from fedtune.errors import MessageError
from fedtune.runtime.relay import evaluation_endpoints, relayed_evaluation


class _Wire:
    """Stands in for the relay's broadcast: keeps what rank 0 sent."""

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send(self, receiver: str, data: bytes) -> None:
        self.sent.append((receiver, data))


def test_the_other_ranks_evaluate_the_adapter_rank_0_evaluates():
    wire, seen, followed = _Wire(), [], []
    lead = relayed_evaluation(wire, lambda state, generate, round_: seen.append(
        (state, generate, round_)) or {"loss": 1.5})
    state = {"a.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "a.lora_B.weight": torch.full((3, 2), -0.25)}
    assert lead(state, True, 4) == {"loss": 1.5}
    lead(state, False, 5)
    endpoints = evaluation_endpoints(lambda s, generate, round_: followed.append((s, generate, round_)))
    for receiver, data in wire.sent:
        assert endpoints[receiver](data) is None  # the other ranks reply nothing
    assert [(g, r) for _, g, r in seen] == [(True, 4), (False, 5)]
    assert [(g, r) for _, g, r in followed] == [(True, None), (False, None)]  # no round: no files
    for got, _, _ in followed:
        assert got.keys() == state.keys()
        for name in state:
            assert torch.equal(got[name], state[name])
    assert all("\x00" in receiver for receiver, _ in wire.sent)  # no client can have that name


def test_damaged_adapter_bytes_are_refused_not_evaluated():
    calls = []
    endpoints = evaluation_endpoints(lambda *a: calls.append(a))
    for handle in endpoints.values():
        with pytest.raises(MessageError, match="relay: rank 0 sent an unreadable adapter"):
            handle(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert calls == []
