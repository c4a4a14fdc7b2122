"""The batched multi-LoRA forward: each row goes through its own client's adapter (by hand)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedtune.models.adapters import AdapterSlot
from fedtune.train.multi_lora import MultiLoRA, NotBatchable


class One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.proj(x)


def _engine(**lora):
    base = One()
    with torch.no_grad():
        base.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    model = get_peft_model(base, LoraConfig(r=1, lora_alpha=2, target_modules=["proj"],
                                            lora_dropout=0.0, **lora))
    slot = AdapterSlot(model)
    return MultiLoRA(SimpleNamespace(model=model, device=torch.device("cpu")), slot.params), slot, model


def test_each_row_goes_through_its_own_clients_adapter():
    engine, slot, model = _engine()
    names = sorted(slot.params)
    a_name = next(n for n in names if "lora_A" in n)
    b_name = next(n for n in names if "lora_B" in n)
    # scaling = alpha / r = 2. Client 1: A = [1, 1], B = [1, 0]^T; client 2: A = [0, 1], B = [0, 3]^T.
    one = engine.leaves({a_name: torch.tensor([[1.0, 1.0]]), b_name: torch.tensor([[1.0], [0.0]])})
    two = engine.leaves({a_name: torch.tensor([[0.0, 1.0]]), b_name: torch.tensor([[0.0], [3.0]])})
    x = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])  # rows 0, 1: client 1; row 2: client 2
    with engine.routed([one, two], [2, 1]):
        out = model(x)
    # row (1, 2): W x = (1, 4); client 1 adds 2 * B (A x) = 2 * (1, 0) * 3 = (6, 0)
    # row (3, 4): W x = (3, 8); + 2 * (1, 0) * 7 = (14, 0)
    # row (5, 6): W x = (5, 12); client 2 adds 2 * (0, 3) * 6 = (0, 36)
    expected = torch.tensor([[[7.0, 4.0]], [[17.0, 8.0]], [[5.0, 48.0]]])
    torch.testing.assert_close(out, expected)
    # gradients reach only the owner's tensors: d(sum of row 2) / d(client 1's A) is 0
    out[2].sum().backward()
    assert float(one[a_name].grad.abs().sum()) == 0.0 and float(two[a_name].grad.abs().sum()) > 0
    # equal shares take the one-batched-matmul path and agree with the unequal path
    with engine.routed([one, two], [1, 1]):
        equal = model(x[1:])
    torch.testing.assert_close(equal, torch.tensor([[[17.0, 8.0]], [[5.0, 48.0]]]))
    # outside the context the model is the plain peft model again (its own zero-B adapter)
    torch.testing.assert_close(model(x), torch.tensor([[[1.0, 4.0]], [[3.0, 8.0]], [[5.0, 12.0]]]))


def test_unequal_and_empty_shares_route_each_row_to_its_owner():
    engine, slot, model = _engine()
    names = sorted(slot.params)
    a_name = next(n for n in names if "lora_A" in n)
    b_name = next(n for n in names if "lora_B" in n)
    # three clients (scaling 2); the middle one has no row in this sub-batch
    one = engine.leaves({a_name: torch.tensor([[1.0, 0.0]]), b_name: torch.tensor([[1.0], [1.0]])})
    idle = engine.leaves({a_name: torch.tensor([[5.0, 5.0]]), b_name: torch.tensor([[5.0], [5.0]])})
    three = engine.leaves({a_name: torch.tensor([[0.0, 1.0]]), b_name: torch.tensor([[2.0], [0.0]])})
    x = torch.tensor([[[1.0, 2.0], [3.0, 1.0]], [[2.0, 2.0], [0.0, 1.0]], [[1.0, 1.0], [4.0, 0.0]]])
    with engine.routed([one, idle, three], [1, 0, 2]):
        out = model(x)
    # row 0 (client 1): W x = (x0, 2 x1), A x = x0, 2 B A x = (2 x0, 2 x0): (1, 2) -> (1+2, 4+2);
    #   (3, 1) -> (3+6, 2+6)
    # rows 1, 2 (client 3): A x = x1, delta = 2 * (2 x1, 0) = (4 x1, 0)
    #   (2, 2) -> (2+8, 4); (0, 1) -> (0+4, 2); (1, 1) -> (1+4, 2); (4, 0) -> (4, 0)
    expected = torch.tensor([[[3.0, 6.0], [9.0, 8.0]], [[10.0, 4.0], [4.0, 2.0]], [[5.0, 2.0], [4.0, 0.0]]])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert idle[a_name].grad is None or float(idle[a_name].grad.abs().sum()) == 0.0
    # client 3's B gets d(sum)/dB = 2 * sum over its tokens of (A x) on both outputs: A x = 2, 1, 1, 0
    torch.testing.assert_close(three[b_name].grad, torch.tensor([[8.0], [8.0]]))


def test_other_adapters_are_refused_with_the_reason():
    with pytest.raises(NotBatchable, match="DoRA"):
        _engine(use_dora=True)
    with pytest.raises(NotBatchable, match="bias"):
        _engine(lora_bias=True)
