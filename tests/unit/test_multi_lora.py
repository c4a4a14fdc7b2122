"""The batched multi-LoRA forward: each row goes through its own client's adapter (by hand)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from conftest import make_char_tokenizer, make_tiny_llama
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.models.adapters import AdapterSlot
from fedtune.train import multi_lora
from fedtune.train.loss import targets_of
from fedtune.train.multi_lora import MultiLoRA, NotBatchable, check_prefix, shared_prefix


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


def _example(ids: list[int], trained_from: int) -> TokenizedExample:
    """Token ids, the positions from `trained_from` on labelled (the response)."""
    return TokenizedExample(ids, [-100] * trained_from + ids[trained_from:])


def _prefix_of(*examples: TokenizedExample) -> int:
    batch = collate(examples, 0)
    return shared_prefix(batch, targets_of(batch["labels"]), examples)


def test_the_shared_prefix_stops_where_rows_differ_or_training_starts():
    # rows agree on their first 4 tokens (2 5 6 7) and differ at the fifth
    a, b = [2, 5, 6, 7, 8, 9], [2, 5, 6, 7, 1, 1, 1]
    # labels from index 5 on: the first target (token 5) is predicted from position 4 -> 4 shared
    assert _prefix_of(_example(a, 5), _example(b, 5)) == 4
    # a labelled from index 4: predicted from position 3, so position 3 must run per row -> 3
    assert _prefix_of(_example(a, 4), _example(b, 5)) == 3
    # a third row differing at index 2 -> 2
    assert _prefix_of(_example(a, 5), _example(b, 5), _example([2, 5, 3, 7, 8, 9], 5)) == 2
    # identical rows with nothing to train on keep their last token per row (every row needs one
    # token after the prefix)
    assert _prefix_of(_example(a, 6), _example(a, 6)) == 5
    # one row, or rows differing at once: nothing to share
    assert _prefix_of(_example(a, 5)) == 0
    assert _prefix_of(_example(a, 5), _example([3, 5, 6, 7, 8, 9], 5)) == 0


def _llama_engine(dropout: float = 0.0, **section):
    tok = make_char_tokenizer()
    model = get_peft_model(make_tiny_llama(tok), LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout,
                                                            target_modules=["q_proj", "v_proj"]))
    slot = AdapterSlot(model)
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), pad_id=tok.pad_token_id,
                              section=SimpleNamespace(**{"gradient_checkpointing": False, **section}),
                              precision=SimpleNamespace(autocast=contextlib.nullcontext))
    return MultiLoRA(trainer, slot.params), slot, model


def test_rows_after_a_cached_prefix_get_each_clients_own_losses_and_gradients():
    engine, slot, model = _llama_engine()
    assert engine.prefix_supported()
    gen = torch.Generator().manual_seed(3)
    states = [{n: torch.randn(p.shape, generator=gen) * 0.5 for n, p in slot.params.items()} for _ in range(2)]
    prompt = [2, 10, 11, 12, 13, 14]
    # client 0: two rows of different lengths (right padding); client 1: three rows
    examples = [_example(prompt + [20, 21, 22, 3], 7), _example(prompt + [23, 24, 3], 7),
                _example(prompt + [30, 31, 3], 7), _example(prompt + [32, 33, 34, 35, 3], 8),
                _example(prompt + [36, 3], 7)]
    owners = torch.tensor([0, 0, 1, 1, 1])
    batch = collate(examples, 0)
    targets = targets_of(batch["labels"])
    start = shared_prefix(batch, targets, examples)
    assert start == 6    # the prompt: the first targets (index 7) are predicted from position 6
    leaves = [engine.leaves(state) for state in states]
    with engine.routed(leaves, [2, 3]):
        losses = engine._prefixed_losses(batch, targets, owners, [2, 3], start)
        losses.sum().backward()
    # each client alone: its rows, whole, through the plain peft model holding its adapter
    for k, state in enumerate(states):
        slot.set(state)
        mine = [ex for ex, o in zip(examples, owners.tolist()) if o == k]
        alone = collate(mine, 0)
        logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
        labels = alone["labels"][:, 1:]
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   reduction="none")[labels.reshape(-1) != -100]
        torch.testing.assert_close(losses[owners[targets.row] == k], expected, rtol=1e-5, atol=1e-6)
        model.zero_grad()
        expected.sum().backward()
        for name, p in slot.params.items():
            assert float(p.grad.abs().sum()) > 0
            torch.testing.assert_close(leaves[k][name].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_the_prefix_is_run_whole_where_it_cannot_be_shared(monkeypatch):
    assert check_prefix(_llama_engine()[2], torch.device("cpu"))[0] in ("cache", "past_key_values")

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return input_ids

    arg, reason = check_prefix(NoCache(), torch.device("cpu"))
    assert arg is None and "no key-value cache" in reason
    assert not _llama_engine(gradient_checkpointing=True)[0].prefix_supported()
    # LoRA dropout: a client's rows would share one dropout mask on the prefix run once for them
    assert not _llama_engine(dropout=0.1)[0].prefix_supported()
    monkeypatch.setattr(multi_lora, "SHARE_PREFIX", False)
    assert not _llama_engine()[0].prefix_supported()
