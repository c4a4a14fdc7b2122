"""FedKSeed: the K-scalar global model, its replay, the aggregation and FedKSeed-Pro's sampling."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.algorithms import build_local, build_strategy, build_view
from fedtune.algorithms.base import ClientUpdate, LocalContext
from fedtune.algorithms.fedkseed import (
    POOL,
    PROBS,
    FedKSeedConfig,
    candidate_seed,
    pro_probabilities,
)
from fedtune.config import TrainSection
from fedtune.data.prompts import TokenizedExample
from fedtune.models.adapters import AdapterSlot
from fedtune.train.local import LocalTrainer
from fedtune.train.zeroth_order import perturbation


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()
    return model


def _examples(n: int = 12) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 40, (10,), generator=gen).tolist()
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * 4 + ids[4:]))
    return out


def _ctx(slot, trainer, train, lr=1e-3, seed=11, server_tensors=None, round_=1):
    return LocalContext(client="c", round=round_, seed=seed, lr=lr, slot=slot, trainer=trainer, train=train,
                        state={}, server_tensors=server_tensors or {}, meta={"lr": lr})


OPTIONS = {"num_seeds": 64, "eps": 1e-3}


def test_replaying_the_folded_scalars_equals_the_directly_updated_model():
    model = _model()
    slot = AdapterSlot(model)
    view = build_view("fedkseed", OPTIONS, slot)
    local = build_local("fedkseed", OPTIONS)
    trainer = LocalTrainer(model, TrainSection(local_steps=40, batch_size=3, lr=1e-3), 0, torch.device("cpu"))
    g0 = view.initial()
    assert g0[POOL].shape == (64,) and not g0[POOL].any()
    view.load(g0)
    theta0 = slot.get()
    outcome = local.fit(_ctx(slot, trainer, _examples()), g0)
    direct = slot.get()
    assert any(not torch.equal(direct[k], theta0[k]) for k in direct)  # it did train
    folded = outcome.update[POOL]
    assert 0 < int((folded != 0).sum()) <= 40 and outcome.metrics["seeds_used"] == int((folded != 0).sum())
    view.load({POOL: folded})          # θ0 − Σ a_k z_k, replayed in ascending k
    replayed = slot.get()
    for k in direct:
        torch.testing.assert_close(replayed[k], direct[k], rtol=0, atol=2e-6)


def test_a_fresh_party_rebuilds_bit_identical_tensors_from_the_same_scalars():
    pool = torch.zeros(64)
    pool[[3, 17, 40]] = torch.tensor([2e-3, -1e-3, 5e-4])
    a, b = AdapterSlot(_model()), AdapterSlot(_model())   # two parties, same recipe seed
    build_view("fedkseed", OPTIONS, a).load({POOL: pool})
    view_b = build_view("fedkseed", OPTIONS, b)
    view_b.load({POOL: pool})
    sa, sb = a.get(), b.get()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # by hand: θ0 − Σ G_k z_k on the first tensor (sorted by name)
    m = _model()
    names = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    first = dict(m.named_parameters())[names[0]].detach().clone()
    params = [dict(m.named_parameters())[n] for n in names]
    for k in (3, 17, 40):
        z = next(iter(perturbation(candidate_seed(FedKSeedConfig(**OPTIONS), k), params)))[1]
        first -= pool[k].item() * z
    torch.testing.assert_close(sa[names[0]], first, rtol=0, atol=1e-6)
    # a cached rebuild after local training restores the same tensors
    with torch.no_grad():
        for p in b.params.values():
            p.add_(1.0)
    view_b.load({POOL: pool})
    assert all(torch.equal(b.get()[k], sa[k]) for k in sa)
    assert view_b.replayed == 3  # the second load came from the cache


def test_server_pool_is_the_weighted_sum_of_folded_scalars():
    strategy = build_strategy("fedkseed", OPTIONS)
    g = {POOL: torch.zeros(64)}
    g[POOL][0] = 1.0
    a = torch.zeros(64)
    a[[0, 1]] = torch.tensor([0.5, 2.0])
    b = torch.zeros(64)
    b[[1, 2]] = torch.tensor([1.0, -3.0])
    strategy.configure_fit(1, ["a", "b"], 0.1)
    new = strategy.aggregate_fit(1, g, [ClientUpdate("a", {POOL: a}, 30), ClientUpdate("b", {POOL: b}, 10)])
    expected = g[POOL].clone()
    expected[0] += 0.75 * 0.5
    expected[1] += 0.75 * 2.0 + 0.25 * 1.0
    expected[2] += 0.25 * -3.0
    torch.testing.assert_close(new[POOL], expected)
    assert strategy.state_dict() == {}


def test_pro_probabilities_by_hand_and_in_the_strategy():
    p = pro_probabilities(torch.tensor([0.0, 1.0, 3.0]))
    e = [math.exp(0.0), math.exp(1 / 3), math.exp(1.0)]
    torch.testing.assert_close(p, torch.tensor([x / sum(e) for x in e], dtype=torch.float32))
    flat = pro_probabilities(torch.zeros(4))
    torch.testing.assert_close(flat, torch.full((4,), 0.25))

    strategy = build_strategy("fedkseed", {**OPTIONS, "num_seeds": 3, "pro": True, "pro_clip": 10.0})
    assert torch.allclose(strategy.fit_tensors(1, {})[PROBS], torch.full((3,), 1 / 3))
    strategy.configure_fit(1, ["a"], 0.5)
    update = torch.tensor([0.0, 0.5, 50.0])  # g = a/η = 1 and 100 (clipped to 10)
    strategy.aggregate_fit(1, {POOL: torch.zeros(3)}, [ClientUpdate("a", {POOL: update}, 1)])
    probs = strategy.fit_tensors(2, {})[PROBS]
    torch.testing.assert_close(probs, pro_probabilities(torch.tensor([0.0, 1.0, 10.0])))
    state = strategy.state_dict()
    again = build_strategy("fedkseed", {**OPTIONS, "num_seeds": 3, "pro": True, "pro_clip": 10.0})
    again.load_state_dict(state)
    torch.testing.assert_close(again.fit_tensors(2, {})[PROBS], probs)


def test_pro_sampling_follows_the_server_probabilities():
    model = _model()
    slot = AdapterSlot(model)
    options = {**OPTIONS, "num_seeds": 4, "pro": True}
    view = build_view("fedkseed", options, slot)
    local = build_local("fedkseed", options)
    trainer = LocalTrainer(model, TrainSection(local_steps=30, batch_size=2, lr=1e-3), 0, torch.device("cpu"))
    view.load(view.initial())
    probs = torch.tensor([0.0, 0.0, 1.0, 0.0])
    outcome = local.fit(_ctx(slot, trainer, _examples(), server_tensors={PROBS: probs}), view.initial())
    assert torch.nonzero(outcome.update[POOL]).flatten().tolist() == [2]
    from fedtune.errors import MessageError

    with pytest.raises(MessageError, match="probability"):
        local.fit(_ctx(slot, trainer, _examples(), server_tensors={PROBS: torch.tensor([0.0, -1.0, 1.0, 0.0])}),
                  view.initial())


def test_recipe_checks():
    from fedtune.config import load_recipe
    from fedtune.errors import RecipeError

    with pytest.raises(RecipeError, match="train.weight_decay"):
        load_recipe(None, ["federation.algorithm=fedkseed", "train.weight_decay=0.01"])
    with pytest.raises(RecipeError, match="federation.compression.up"):
        load_recipe(None, ["federation.algorithm=fedkseed", "federation.compression.up.method=int8"])
    with pytest.raises(RecipeError, match="num_seeds"):
        load_recipe(None, ["federation.algorithm=fedkseed", "federation.options={num_seeds: 0}"])
