"""Local training: real gradient accumulation, step counts, the learning-rate schedule, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.config import TrainSection
from fedtune.data.prompts import TokenizedExample
from fedtune.runtime.server import sample_clients
from fedtune.seeding import derive_seed
from fedtune.train.local import LocalTrainer, lr_for_round, micro_batches, steps_for


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _examples():
    # Different lengths and different numbers of answer tokens per example.
    out = []
    for i in range(8):
        prompt = [1] + [4 + (i + j) % 20 for j in range(3 + i % 3)]
        answer = [5 + (2 * i + j) % 20 for j in range(1 + i % 4)] + [2]
        out.append(TokenizedExample(prompt + answer, [-100] * len(prompt) + answer))
    return out


def _train(batch_size, grad_accum, steps=1):
    model = _model()
    section = TrainSection(local_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                           optimizer="sgd", max_grad_norm=None)
    result = LocalTrainer(model, section, pad_id=0, device=torch.device("cpu")).train(
        _examples(), lr=0.5, seed=11)
    return model, result


def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size():
    big, r_big = _train(batch_size=4, grad_accum=1)
    acc, r_acc = _train(batch_size=2, grad_accum=2)
    assert r_big.steps == r_acc.steps == 1
    assert r_big.examples == r_acc.examples == 4
    for (name, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert r_big.loss == pytest.approx(r_acc.loss, rel=1e-6)


def test_accumulation_is_not_just_more_steps():
    # Two optimizer steps of 2 examples differ from one step over the same 4 examples.
    acc, _ = _train(batch_size=2, grad_accum=2, steps=1)
    steps, r = _train(batch_size=2, grad_accum=1, steps=2)
    assert r.steps == 2
    diffs = [(a - b).abs().max().item() for a, b in zip(acc.parameters(), steps.parameters())]
    assert max(diffs) > 1e-5


def test_steps_from_epochs():
    s = TrainSection(local_epochs=1.5, batch_size=4, grad_accum=2)
    assert steps_for(s, 20) == math.ceil(1.5 * 20 / 8)
    assert steps_for(TrainSection(local_steps=7), 1000) == 7


def test_micro_batches_cover_every_example_once_per_epoch():
    it = micro_batches(10, 4, seed=1)
    epoch = [next(it) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(i for b in epoch for i in b) == list(range(10))
    again = micro_batches(10, 4, seed=1)
    assert [next(again) for _ in range(3)] == epoch


@pytest.mark.parametrize("schedule,round_,expected", [
    ("constant", 7, 0.1), ("linear", 1, 0.1), ("linear", 3, 0.1 * (1 - 2 / 4)),
    ("cosine", 1, 0.1), ("cosine", 3, 0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 4))),
])
def test_lr_schedule_across_rounds(schedule, round_, expected):
    assert lr_for_round(TrainSection(lr=0.1, lr_schedule=schedule), round_, 4) == pytest.approx(expected)


def test_lr_warmup_rounds():
    s = TrainSection(lr=0.3, warmup_rounds=2, lr_schedule="constant")
    assert [lr_for_round(s, r, 5) for r in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.3])


def test_sample_clients_is_seeded_per_round_and_keeps_order():
    clients = [f"c{i}" for i in range(10)]
    a = sample_clients(clients, 3, seed=5, round_=1)
    assert len(a) == 3 and a == sorted(a, key=clients.index)
    assert a == sample_clients(clients, 3, seed=5, round_=1)
    picks = {tuple(sample_clients(clients, 3, seed=5, round_=r)) for r in range(1, 8)}
    assert len(picks) > 1
    assert sample_clients(clients, 10, seed=5, round_=1) == clients


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "fit", 1, "client_0") == derive_seed(0, "fit", 1, "client_0")
    assert derive_seed(0, "fit", 1, "client_0") != derive_seed(0, "fit", 1, "client_1")
    assert derive_seed(0, "fit", 1, "client_0") != derive_seed(1, "fit", 1, "client_0")
    assert 0 <= derive_seed(123, "x") < 2**63
