"""Zeroth-order steps: reproducible perturbations, exact restore, estimates that follow the gradient."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.algorithms import build_strategy
from fedtune.algorithms.base import ClientUpdate
from fedtune.algorithms.fedmezo import personal_phi
from fedtune.train.zeroth_order import apply_zo_update, perturbation, projected_gradient

_HASH = """
import hashlib, torch
from fedtune.train.zeroth_order import perturbation
ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 5), (7,), (2, 2, 2)]]
h = hashlib.sha256()
for _, z in perturbation(123456789, ps):
    h.update(z.numpy().tobytes())
print(h.hexdigest())
"""


def test_perturbation_is_bit_identical_across_calls_and_processes():
    local = hashlib.sha256()
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 5), (7,), (2, 2, 2)]]
    for _, z in perturbation(123456789, params):
        local.update(z.numpy().tobytes())
    again = [z for _, z in perturbation(123456789, params)]
    assert all(torch.equal(a, b) for a, b in zip(again, [z for _, z in perturbation(123456789, params)]))
    other = subprocess.run([sys.executable, "-c", _HASH], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == local.hexdigest()


def _model_and_batch():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()
    model.requires_grad_(False)
    params = [model.model.norm.weight, model.model.layers[0].input_layernorm.weight]
    ids = torch.randint(4, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    return model, params, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_projected_gradient_restores_the_parameters():
    model, params, batch = _model_and_batch()
    before = [p.clone() for p in params]
    projected_gradient(model, params, batch, seed=7, eps=1e-3)
    for a, b in zip(params, before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_zeroth_order_estimate_follows_the_true_gradient():
    from fedtune.train.loss import token_loss_sum

    model, params, batch = _model_and_batch()
    for p in params:
        p.requires_grad_(True)
    loss_sum, n = token_loss_sum(model, batch)
    (loss_sum / n).backward()
    true = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.requires_grad_(False)
    estimate = torch.zeros_like(true)
    samples = 200
    for seed in range(samples):
        g, _ = projected_gradient(model, params, batch, seed=seed, eps=1e-3)
        estimate += g * torch.cat([z.flatten() for _, z in perturbation(seed, params)]) / samples
    cosine = torch.nn.functional.cosine_similarity(estimate, true, dim=0).item()
    assert cosine > 0.7, cosine


def test_apply_zo_update_by_hand():
    p = torch.nn.Parameter(torch.ones(4))
    z = next(perturbation(5, [p]))[1]
    apply_zo_update([p], seed=5, grad=2.0, lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(p.data, torch.ones(4) * (1 - 0.1 * 0.5) - 0.1 * 2.0 * z)
    q = torch.nn.Parameter(torch.ones(4))
    apply_zo_update([q], seed=5, grad=2.0, lr=0.1, weight_decay=0.5, decay_mask=[False])
    torch.testing.assert_close(q.data, torch.ones(4) - 0.1 * 2.0 * z)


def test_personal_phi_by_hand():
    # mean 3, deviations -2, -1, 3 -> divided by the largest, 3
    assert personal_phi({"a": 1.0, "b": 2.0, "c": 6.0}) == pytest.approx({"a": -2 / 3, "b": -1 / 3, "c": 1.0})
    assert personal_phi({"a": 1.0, "b": 1.0}) == {"a": 0.0, "b": 0.0}


def test_fedmezo_gives_each_client_its_own_learning_rate_and_checkpoints_signals():
    s = build_strategy("fedmezo", {"alpha": 0.5, "signal": "loss"}, n_clients=3)
    g = {"w": torch.zeros(2)}
    assert s.configure_fit(1, ["a", "b", "c"], 1.0) == {c: {"lr": 1.0} for c in "abc"}
    ups = [ClientUpdate(c, {"w": torch.ones(2)}, 1, {"train_loss": loss}) for c, loss in zip("abc", (1.0, 2.0, 6.0))]
    s.aggregate_fit(1, g, ups)
    lrs = {c: m["lr"] for c, m in s.configure_fit(2, ["a", "b", "c"], 1.0).items()}
    assert lrs == pytest.approx({"a": 1 - 0.5 * 2 / 3, "b": 1 - 0.5 / 3, "c": 1.5})
    t = build_strategy("fedmezo", {"alpha": 0.5}, n_clients=3)
    t.load_state_dict(s.state_dict())
    assert t.configure_fit(2, ["a", "b", "c"], 1.0) == s.configure_fit(2, ["a", "b", "c"], 1.0)
