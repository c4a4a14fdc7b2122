"""Memory-efficient local steps: sequence packing, mixed precision (bf16, fp16 with a gradient
scaler), float32 adapters on a half-precision base, gradient checkpointing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.config import AdapterSection, TrainSection
from fedtune.data.prompts import IGNORE_INDEX, TokenizedExample
from fedtune.errors import ModelError
from fedtune.models.adapters import AdapterSlot, attach_adapter
from fedtune.train.local import LocalTrainer
from fedtune.train.packing import check_packing, collate_packed, length_groups, pack_rows
from fedtune.train.precision import Precision, resolve_precision

CPU = torch.device("cpu")


def _lora_model(dtype=torch.float32, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    base = LlamaForCausalLM(cfg).to(dtype).requires_grad_(False)
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    # A non-zero B, so that the adapter changes the output and its gradients reach A.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _examples(n=7):
    out = []
    for i in range(n):
        prompt = [1] + [4 + (3 * i + j) % 30 for j in range(2 + i % 4)]
        answer = [5 + (5 * i + j) % 30 for j in range(1 + i % 5)] + [2]
        out.append(TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out


def _train(model, **train):
    section = TrainSection(**{"local_steps": 2, "batch_size": 4, "optimizer": "sgd",
                              "max_grad_norm": None, **train})
    result = LocalTrainer(model, section, pad_id=0, device=CPU).train(_examples(), lr=0.5, seed=3)
    return AdapterSlot(model).get(), result


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_rows_is_first_fit_decreasing():
    # lengths 5, 3, 2, 4 into rows of 6: 5 alone; 4 opens a row; 3 opens a row; 2 joins the 4.
    assert pack_rows([5, 3, 2, 4], 6) == [[0], [3, 2], [1]]
    assert pack_rows([2, 2, 2], 6) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="7 tokens"):
        pack_rows([7], 6)


def test_length_groups_pays_padding_against_the_cost_of_another_pass():
    lengths = [9, 2, 9, 3, 2, 8]
    # one group: 6 rows x 9 = 54 padded tokens. Two: {2, 2, 3} x 3 + {8, 9, 9} x 9 = 9 + 27 = 36.
    # Three: {2, 2} x 2 + {3} x 3 + {8, 9, 9} x 9 = 4 + 3 + 27 = 34. Four: ... + {8} + {9, 9} = 33.
    assert length_groups(lengths, extra_cost=100) == [[1, 4, 3, 5, 0, 2]]       # 54 < 36 + 100
    assert length_groups(lengths, extra_cost=10) == [[1, 4, 3], [5, 0, 2]]      # 36 + 10 < 54, < 34 + 20
    assert length_groups(lengths, extra_cost=0) == [[1, 4], [3], [5], [0, 2]]   # 33, at most 4 groups
    assert length_groups(lengths, extra_cost=1) == [[1, 4], [3], [5, 0, 2]]     # 34 + 2 ties 33 + 3: fewer
    assert length_groups(lengths, extra_cost=1, max_groups=2) == [[1, 4, 3], [5, 0, 2]]
    assert length_groups([4, 4, 4], extra_cost=0) == [[0, 1, 2]]   # equal lengths never split
    assert length_groups([], extra_cost=0) == []


def test_collate_packed_lays_examples_end_to_end_with_their_own_positions():
    a = TokenizedExample([1, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 8])
    b = TokenizedExample([1, 9], [IGNORE_INDEX, 9])
    c = TokenizedExample([1, 5, 6, 2], [IGNORE_INDEX, 5, 6, 2])
    batch = collate_packed([a, b, c], pad_id=0)   # rows of 4 tokens, the longest example
    # FFD by length: c (4) alone; a (3) opens row 2; b (2) fits nowhere (row 2 has 1 free): row 3.
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 8, 0], [1, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, 2], [-100, -100, 8, -100],
                                        [-100, 9, -100, -100]]
    wide = collate_packed([a, b, c], pad_id=0, capacity=5)
    # c (4) alone in row 1 (1 free); a (3) opens row 2 (2 free); b (2) joins a.
    assert wide["input_ids"].tolist() == [[1, 5, 6, 2, 0], [1, 7, 8, 1, 9]]
    assert wide["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    # b's first token is never the target of a's last one.
    assert wide["labels"].tolist() == [[-100, 5, 6, 2, -100], [-100, -100, 8, -100, 9]]


def test_a_packed_step_equals_the_padded_step():
    padded, r_pad = _train(_lora_model())
    packed, r_pack = _train(_lora_model(), packing=True)
    assert r_pack.tokens == r_pad.tokens and r_pack.examples == r_pad.examples == 7
    assert r_pack.loss == pytest.approx(r_pad.loss, rel=1e-5)
    start = AdapterSlot(_lora_model()).get()
    assert max((padded[k] - start[k]).abs().max().item() for k in padded) > 1e-3   # it moved
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=0, atol=2e-6, msg=name)


class _BoundaryBlind(torch.nn.Module):
    """Logits from the running mean of the embeddings: causal, but blind to packed boundaries."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 8)
        self.out = torch.nn.Linear(8, 40)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return SimpleNamespace(logits=self.out(h))


def test_packing_is_refused_for_a_model_that_mixes_packed_examples():
    with pytest.raises(ModelError, match="crosses example boundaries"):
        check_packing(_BoundaryBlind(), CPU, 40)
    check_packing(_lora_model(), CPU, 40)   # a Llama keeps them apart: no error


def test_packing_is_refused_for_virtual_token_methods(tiny_model_dir):
    from fedtune.config import ModelSection
    from fedtune.models.loading import load_base_model

    base, _ = load_base_model(ModelSection(name=tiny_model_dir))
    model = attach_adapter(base, AdapterSection(method="prompt_tuning"))
    with pytest.raises(ModelError, match="packing"):
        LocalTrainer(model, TrainSection(packing=True), pad_id=0, device=CPU)


def test_packing_with_dp_sgd_is_a_recipe_error():
    with pytest.raises(ValueError, match="packing is not available with dp_sgd"):
        TrainSection(packing=True, dp_sgd={"noise_multiplier": 1.0})


# ---------------------------------------------------------------------------------------------
# Mixed precision


def test_precision_auto_and_its_refusals():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", CPU, torch.bfloat16) == "bf16"
    assert resolve_precision("auto", CPU, torch.float16) == "fp16"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ModelError, match="train.precision fp32 needs a float32 base"):
        resolve_precision("fp32", CPU, torch.bfloat16)
    assert Precision("fp32", CPU).scaler() is None and Precision("bf16", CPU).scaler() is None
    assert isinstance(Precision("fp16", CPU).scaler(), torch.amp.GradScaler)


def test_a_peft_adapter_on_a_half_precision_base_is_float32(tiny_model_dir):
    from fedtune.config import ModelSection
    from fedtune.models.loading import load_base_model

    base, _ = load_base_model(ModelSection(name=tiny_model_dir, dtype="bfloat16"))
    model = attach_adapter(base, AdapterSection(method="lora", r=2))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_a_bf16_base_trains_a_float32_adapter_under_bf16_autocast():
    model = _lora_model(torch.bfloat16)
    state, result = _train(model)   # precision auto on CPU with a bf16 base: bf16 autocast
    reference, ref = _train(_lora_model())   # float32 throughout
    assert all(t.dtype == torch.float32 for t in state.values())   # what travels stays float32
    assert torch.isfinite(torch.tensor(result.loss))
    assert result.loss == pytest.approx(ref.loss, rel=0.02)
    for name in state:
        torch.testing.assert_close(state[name], reference[name], rtol=0, atol=0.02, msg=name)


def test_fp16_with_a_gradient_scaler_stays_finite_and_close_to_fp32():
    reference, ref = _train(_lora_model())
    fp16_base = _lora_model(torch.float16)
    for model in (_lora_model(), fp16_base):   # fp16 autocast on a float32 and on an fp16 base
        state, result = _train(model, precision="fp16")
        assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in state.values())
        assert result.loss == pytest.approx(ref.loss, rel=0.02)
        for name in state:
            torch.testing.assert_close(state[name], reference[name], rtol=0, atol=0.02, msg=name)


def test_an_overflowing_fp16_step_is_skipped_not_written_into_the_adapter():
    model = _lora_model()
    trainer = LocalTrainer(model, TrainSection(precision="fp16", max_grad_norm=1.0), 0, CPU)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.5)
    scaler = trainer.precision.scaler()
    scaler.scale(torch.ones(()))   # as the data terms' backward does
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = float("inf")
    trainer._step(params, optimizer, None, None, scaler)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert scaler.get_scale() == 65536.0 / 2   # the scale backs off after an overflow
    for p in params:   # a clean step goes through, on the unscaled gradient
        p.grad = torch.full_like(p, 65536.0 / 2 * 1e-3)
    trainer._step(params, optimizer, None, None, scaler)
    torch.testing.assert_close(params[1], before[1] - 0.5 * 1e-3 * torch.ones_like(params[1])
                               * min(1.0, 1.0 / (1e-3 * sum(p.numel() for p in params) ** 0.5)))


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_gradient_checkpointing_gives_the_same_step():
    plain, r_plain = _train(_lora_model())
    model = _lora_model()
    checkpointed, r_ckpt = _train(model, gradient_checkpointing=True)
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert r_ckpt.loss == pytest.approx(r_plain.loss, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_refused_for_a_model_without_it():
    model = _BoundaryBlind()
    with pytest.raises(ModelError, match="does not support gradient checkpointing"):
        LocalTrainer(model, TrainSection(gradient_checkpointing=True), 0, CPU)


# ---------------------------------------------------------------------------------------------
# The loss over response tokens only


class _FixedLogits(torch.nn.Module):
    """Returns the given logits (with `extra` virtual positions first, as prompt tuning does)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits)


def test_response_loss_sum_takes_only_labelled_positions(monkeypatch):
    import math

    from fedtune.train import loss as loss_module

    # Two examples of 3 tokens; 2 vocabulary entries; one virtual token in front of each.
    logits = torch.tensor([[[9.0, 9.0], [0.0, 1.0], [2.0, 0.0], [5.0, 5.0]],
                           [[9.0, 9.0], [1.0, 1.0], [0.0, 3.0], [5.0, 5.0]]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
             "labels": torch.tensor([[-100, 1, 0], [-100, -100, 1]])}
    # Example 0: label 1 from logits (0, 1), label 0 from (2, 0); example 1: label 1 from (0, 3).
    # Positions 0 (virtual), and the last (predicts nothing) never count.
    expected = (-math.log(math.e / (1 + math.e)) - math.log(math.e**2 / (math.e**2 + 1))
                - math.log(math.e**3 / (1 + math.e**3)))
    targets = loss_module.targets_of(batch["labels"])
    assert targets.count == 3
    total = loss_module.response_loss_sum(_FixedLogits(logits), batch, targets)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    monkeypatch.setattr(loss_module, "CHUNK", 4)   # without gradients: chunks of 2 rows of 2
    with torch.no_grad():
        chunked = loss_module.response_loss_sum(_FixedLogits(logits), batch, targets)
    assert float(chunked) == pytest.approx(expected, rel=1e-6)
    assert loss_module.token_loss_sum(_FixedLogits(logits), batch)[1] == 3
