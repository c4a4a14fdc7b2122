"""Local DP-SGD (Opacus): per-example clipping, the noise's spread, accounting, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.config import DPSGDSection, TrainSection, load_recipe
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.errors import FedtuneError, RecipeError
from fedtune.train.dp_sgd import HISTORY, dp_sgd_epsilon, record_dp_steps
from fedtune.train.local import LocalTrainer
from fedtune.train.loss import example_losses

pytest.importorskip("opacus")


def _lora_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero; make every adapter tensor matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _examples(n=4):
    out = []
    for i in range(n):
        prompt = [1] + [4 + (i + j) % 20 for j in range(3 + i % 3)]
        answer = [5 + (3 * i + j) % 20 for j in range(1 + i % 4)] + [2]
        out.append(TokenizedExample(prompt + answer, [-100] * len(prompt) + answer))
    return out


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(examples, *, batch_size, grad_accum=1, noise=0.0, clip=1.0, steps=1, lr=1.0):
    """One DP-SGD run from the same start; returns (Δ per adapter tensor, trainer result)."""
    model = _lora_model()
    before = _trainable(model)
    section = TrainSection(local_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                           optimizer="sgd", max_grad_norm=None, dp_sgd=DPSGDSection(
                               noise_multiplier=noise, max_grad_norm=clip, noise_seed=5))
    result = LocalTrainer(model, section, pad_id=0, device=torch.device("cpu")).train(
        examples, lr=lr, seed=11)
    after = _trainable(model)
    return {n: after[n] - before[n] for n in before}, result, model


def _per_example_grads(examples):
    """Each example's gradient of its mean response-token loss, computed alone (no Opacus)."""
    model = _lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = []
    for ex in examples:
        loss_sum, n_tok = example_losses(model, collate([ex], pad_id=0))
        grads.append(dict(zip(names, torch.autograd.grad((loss_sum / n_tok).sum(), params))))
    return grads


def _norm(state):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()))


def test_each_example_is_clipped_alone_and_the_step_is_their_mean():
    examples = _examples(4)
    grads = _per_example_grads(examples)
    norms = [_norm(g) for g in grads]
    clip = sorted(norms)[1] * 1.01  # clips some examples, not others
    assert min(norms) < clip < max(norms)
    # q = 4 / 4: every example is in the (only) batch; no noise; SGD with lr 1.
    delta, result, _ = _train(examples, batch_size=4, clip=clip)
    assert result.dp.sample_rate == 1.0 and result.examples == 4
    expected = {n: -sum(g[n] * min(1.0, clip / gn) for g, gn in zip(grads, norms)) / 4
                for n in grads[0]}
    for n in expected:
        torch.testing.assert_close(delta[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_one_examples_contribution_is_bounded_by_the_clip_norm():
    examples = _examples(1)
    grads = _per_example_grads(examples)
    clip = _norm(grads[0]) / 10  # a large gradient, cut to a tenth
    delta, _, _ = _train(examples, batch_size=1, clip=clip)
    assert _norm(delta) == pytest.approx(clip, rel=1e-4)  # lr 1, expected batch 1


def test_micro_batches_accumulate_per_example_clipped_gradients():
    examples = _examples(4)
    clip = 0.5 * min(_norm(g) for g in _per_example_grads(examples))  # every example clipped
    one, _, _ = _train(examples, batch_size=4, clip=clip)
    acc, r, _ = _train(examples, batch_size=2, grad_accum=2, clip=clip)  # expected batch 4, q = 1
    assert r.dp.sample_rate == 1.0
    for n in one:
        torch.testing.assert_close(acc[n], one[n], rtol=1e-4, atol=1e-7, msg=n)


def test_noise_has_std_sigma_times_clip_over_expected_batch():
    examples = _examples(8)
    sigma, clip, batch = 3.0, 0.2, 4   # q = 4 / 8
    clean, r_clean, _ = _train(examples, batch_size=batch, clip=clip)
    noisy, r_noisy, _ = _train(examples, batch_size=batch, clip=clip, noise=sigma)
    assert r_clean.examples == r_noisy.examples  # the same Poisson batch (sampling seed)
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean]).double()  # -lr·z/B
    assert noise.numel() > 500
    assert noise.std().item() == pytest.approx(sigma * clip / batch, rel=0.1)
    assert abs(noise.mean().item()) < 4 * sigma * clip / batch / noise.numel() ** 0.5


def test_opacus_leaves_no_hooks_or_attributes_on_the_shared_model():
    _, _, model = _train(_examples(4), batch_size=2, noise=1.0)
    assert not any(m._forward_hooks or m._backward_hooks or getattr(m, "_forward_pre_hooks", None)
                   for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") or p.grad is not None
                   for p in model.parameters())


def test_epsilon_is_opacus_accountants_for_a_known_setting():
    from opacus.accountants import PRVAccountant, RDPAccountant

    sigma, q, steps, delta = 1.1, 0.01, 1000, 1e-5
    ref = RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    eps = dp_sgd_epsilon([(sigma, q, steps)], delta)
    assert eps == pytest.approx(ref.get_epsilon(delta), rel=1e-9)
    # An independent accountant (Google's dp-accounting RDP) agrees to a few per cent.
    import dp_accounting
    from dp_accounting import rdp

    google = rdp.RdpAccountant()
    google.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                   steps)
    assert eps == pytest.approx(google.get_epsilon(delta), rel=0.05)
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    assert dp_sgd_epsilon([(sigma, q, steps)], delta, "prv") == pytest.approx(
        prv.get_epsilon(delta), rel=1e-6)
    assert dp_sgd_epsilon([(sigma, q, steps)], delta, "prv") < eps  # PRV is tighter than RDP


def test_a_clients_epsilon_composes_over_its_rounds():
    section = DPSGDSection(noise_multiplier=1.0)
    state: dict = {}
    for _ in range(2):
        metrics = {"dp_steps": 50, "dp_sample_rate": 0.05, "dp_noise_multiplier": 1.0}
        record_dp_steps(state, metrics, section)
    assert state[HISTORY].shape == (2, 3)
    assert metrics["dp_epsilon"] == pytest.approx(dp_sgd_epsilon([(1.0, 0.05, 100)], 1e-5))
    assert metrics["dp_delta"] == 1e-5
    record_dp_steps(state, {"dp_steps": 1, "dp_sample_rate": 0.05, "dp_noise_multiplier": 0.0},
                    section)
    assert dp_sgd_epsilon([(0.0, 0.05, 1)], 1e-5) == math.inf
    with pytest.raises(FedtuneError, match="no DP-SGD steps"):
        record_dp_steps(state, {"train_loss": 1.0}, section)


def test_recipe_errors_name_the_key():
    r = load_recipe("default", ["train.dp_sgd={noise_multiplier: 0.8, accountant: prv}"])
    assert r.train.dp_sgd.noise_multiplier == 0.8 and r.train.dp_sgd.max_grad_norm == 1.0
    with pytest.raises(RecipeError, match=r"train\.dp_sgd\.sigma: unknown key; allowed here: "
                                          r"noise_multiplier, max_grad_norm"):
        load_recipe("default", ["train.dp_sgd={noise_multiplier: 1, sigma: 1}"])
    with pytest.raises(RecipeError, match=r"train\.dp_sgd\.noise_multiplier: Field required"):
        load_recipe("default", ["train.dp_sgd={max_grad_norm: 1}"])
    with pytest.raises(RecipeError, match="zeroth-order"):
        load_recipe("default", ["train.dp_sgd={noise_multiplier: 1}", "federation.algorithm=fedmezo"])
