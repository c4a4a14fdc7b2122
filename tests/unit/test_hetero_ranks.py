"""Heterogeneous LoRA ranks: each client's rank, its rank-r view of the one model, the server's
per-client shapes, HetLoRA's and FlexLoRA's aggregation, all against values worked by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedtune.algorithms.base import ClientUpdate, LocalContext
from fedtune.algorithms.flexlora import FlexLoRA
from fedtune.algorithms.flora import FLoRAView, flora_aggregate, stack
from fedtune.algorithms.hetlora import (
    RANK,
    TAIL,
    HetLoRA,
    HetLoRALocal,
    hetlora_aggregate,
    norm_weights,
    tail_regulariser,
)
from fedtune.algorithms.options import FlexLoRAConfig, HetLoRAConfig
from fedtune.config import Recipe, load_recipe
from fedtune.config.schema import RankRule
from fedtune.errors import MessageError, ModelError, RecipeError
from fedtune.models.adapters import AdapterSlot, attach_adapter
from fedtune.models.rank_plan import RankSlot, client_ranks, pad, truncate
from fedtune.runtime.client_shapes import ClientShapes
from fedtune.transport.codec import check_message
from fedtune.transport.compression import CompressionConfig
from fedtune.wire import Message, MessageKind

A = "m.q.lora_A.default.weight"
B = "m.q.lora_B.default.weight"
T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


def test_ranks_from_a_list_a_distribution_and_a_resource_rule():
    assert client_ranks([2, 4, 8], 3, seed=0) == {"client_0": 2, "client_1": 4, "client_2": 8}
    with pytest.raises(ValueError, match="3 ranks for 2 clients"):
        client_ranks([2, 4, 8], 2, seed=0)
    # resources 4, 1, 2, 8: sorted c1 < c2 < c0 < c3; two rank levels, two clients each
    rule = RankRule(ranks=[4, 2], resources=[4, 1, 2, 8])
    assert client_ranks(rule, 4, seed=0) == {"client_0": 4, "client_1": 2, "client_2": 2, "client_3": 4}
    drawn = client_ranks(RankRule(ranks=[2, 16], weights=[1.0, 3.0]), 400, seed=5)
    assert drawn == client_ranks(RankRule(ranks=[2, 16], weights=[1.0, 3.0]), 400, seed=5)  # seeded
    share = sum(r == 16 for r in drawn.values()) / 400
    assert 0.68 < share < 0.82  # 3/4 expected
    with pytest.raises(ValueError, match="not both"):
        RankRule(ranks=[2], weights=[1.0], resources=[1.0])


def test_truncate_and_pad_by_hand():
    state = {A: T([[1, 2], [3, 4], [5, 6]]), B: T([[1, 2, 3]]), "norm": T([7])}
    cut = truncate(state, 2)
    assert cut[A].tolist() == [[1, 2], [3, 4]] and cut[B].tolist() == [[1, 2]] and cut["norm"].tolist() == [7]
    back = pad(cut, 3)
    assert back[A].tolist() == [[1, 2], [3, 4], [0, 0]] and back[B].tolist() == [[1, 2, 0]]


def _recipe(tiny_recipe, **kw) -> Recipe:
    return load_recipe(tiny_recipe(**kw))


def test_recipe_checks(tiny_recipe):
    ok = dict(federation__algorithm="hetlora", adapter__rank_per_client=[1, 2, 4])
    assert _recipe(tiny_recipe, **ok).adapter.rank_per_client == [1, 2, 4]
    bad = [
        (dict(ok, adapter__rank_per_client=[1, 2, 8]), "rank 8 is above adapter.r=4"),
        (dict(ok, adapter__rank_per_client=[1, 2]), "2 ranks for federation.clients=3"),
        (dict(ok, federation__algorithm="fedavg"), "cannot aggregate LoRA factors of different ranks"),
        (dict(ok, adapter__method="ia3"), "adapter.method"),
        (dict(ok, federation__secure_aggregation={"enabled": True}), "secure aggregation"),
    ]
    for kw, message in bad:
        with pytest.raises(RecipeError, match=message):
            _recipe(tiny_recipe, **kw)


@pytest.fixture
def lora_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from fedtune.config.schema import AdapterSection

    torch.manual_seed(0)
    section = AdapterSection(method="lora", r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj"])
    model = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), section)
    return model


def _layer(model):
    return next(m for m in model.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "scaling", None), dict)
                and "default" in m.lora_A)


def test_rank_slot_scale_frame_and_zero_tail(lora_model):
    slot = AdapterSlot(lora_model)
    layer = _layer(lora_model)
    a_name = next(n for n in slot.params if ".lora_A." in n and "layers.0." in n)
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    two = RankSlot(slot, rank=2, r_max=4, alpha=8.0)
    state = {n: torch.full_like(t, 0.5) for n, t in two.get().items()}
    assert state[a_name].shape == (2, 16) and state[b_name].shape == (16, 2)
    two.set(state)
    assert layer.scaling["default"] == 8.0 / 2          # the client's own α/r_k
    a, b = slot.params[a_name], slot.params[b_name]
    assert a[2:].abs().sum() == 0 and b[:, 2:].abs().sum() == 0
    # wire frame: s_max·B_wire·A_wire is the client's real ΔW = s_k·B_k·A_k
    real = layer.scaling["default"] * (b.detach() @ a.detach())
    torch.testing.assert_close(real, (8.0 / 4) * (state[b_name] @ state[a_name]))
    torch.testing.assert_close(two.get()[b_name], state[b_name])   # get is set's inverse
    # the zero tail gets no gradient, so training cannot revive it
    lora_model.train()
    out = lora_model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    out.logits.pow(2).mean().backward()
    assert a.grad[2:].abs().sum() == 0 and b.grad[:, 2:].abs().sum() == 0
    assert a.grad[:2].abs().sum() > 0 or b.grad[:, :2].abs().sum() > 0
    with pytest.raises(Exception, match="this client's rank is 2"):
        two.set({n: torch.zeros(4, t.shape[1]) if ".lora_A." in n else torch.zeros(t.shape[0], 4)
                 for n, t in slot.get().items()})
    RankSlot(slot, rank=4, r_max=4, alpha=8.0).set(slot.get())
    assert layer.scaling["default"] == 2.0                # the full rank's scale back


def test_hetlora_aggregation_by_hand():
    global_state = {A: T([[0, 0], [0, 0]]), B: T([[0, 0]])}   # rank 2, d_in 2, d_out 1
    c1 = {A: T([[1, 0]]), B: T([[3]])}                          # rank 1: product [[3, 0]], norm 3
    c2 = {A: T([[0, 1], [1, 1]]), B: T([[4, 0]])}              # rank 2: product [[0, 4]], norm 4
    weights = norm_weights([c1, c2])
    assert weights == pytest.approx([3 / 7, 4 / 7])
    out = hetlora_aggregate(global_state, [c1, c2], weights)
    # c1 zero-padded: A [[1,0],[0,0]], B [[3,0]]
    torch.testing.assert_close(out[A], T([[3 / 7 * 1 + 4 / 7 * 0, 4 / 7 * 1], [4 / 7, 4 / 7]]))
    torch.testing.assert_close(out[B], T([[3 / 7 * 3 + 4 / 7 * 4, 0]]))


def test_hetlora_strategy_adds_each_update_to_its_rank_of_the_global():
    global_state = {A: T([[1, 0], [0, 1]]), B: T([[1, 1]])}
    u1 = ClientUpdate("c1", {A: T([[0, 1]]), B: T([[1]])}, 5)   # local A [[1,1]], B [[2]]
    u2 = ClientUpdate("c2", {A: T([[0, 0], [0, 0]]), B: T([[0, 0]])}, 5)  # local = global
    out = HetLoRA(HetLoRAConfig(weighting="uniform")).aggregate_fit(1, global_state, [u1, u2])
    torch.testing.assert_close(out[A], T([[1, 0.5], [0, 0.5]]))
    torch.testing.assert_close(out[B], T([[1.5, 0.5]]))


def test_regulariser_has_the_gradient_of_the_formula():
    a = T([[1, 0], [0, 2], [3, 4], [0, 0]]).requires_grad_(True)   # rank 4, γ=0.5: tail rows 2..3
    b = T([[1, 1, 2, 0], [0, 0, 0, 1]]).requires_grad_(True)
    value = tail_regulariser({A: a, B: b}, rank=4, gamma=0.5)
    na, nb = 5.0, math.sqrt(5.0)           # ‖A[2:4]‖ = ‖(3,4)‖, ‖B[:, 2:4]‖ = ‖(2, 1)‖
    assert value.item() == pytest.approx(na * nb)
    value.backward()
    # d(‖B_t‖·‖A_t‖)/dB_t = ‖A_t‖·B_t/‖B_t‖, nothing outside the tail
    torch.testing.assert_close(b.grad, T([[0, 0, na * 2 / nb, 0], [0, 0, 0, na * 1 / nb]]))
    torch.testing.assert_close(a.grad, T([[0, 0], [0, 0], [nb * 3 / na, nb * 4 / na], [0, 0]]))


class _NoTraining:
    def train(self, examples, *, lr, seed, extra_loss=None):
        assert extra_loss is not None and extra_loss().requires_grad  # the term is differentiable
        return SimpleNamespace(loss=1.0, steps=1, examples=1, seconds=0.0, dp=None)


def test_pruning_when_the_tail_shrinks():
    params = {A: T([[1, 0], [0, 1], [1, 1], [2, 2]]).requires_grad_(True),
              B: T([[1, 1, 1, 1]]).requires_grad_(True)}
    slot = SimpleNamespace(params=params, get=lambda: {k: v.detach().clone() for k, v in params.items()})
    local = HetLoRALocal(HetLoRAConfig(reg=0.1, gamma=0.5))
    received = {k: v.detach().clone() for k, v in params.items()}
    state = {TAIL: torch.tensor(100.0, dtype=torch.float64)}   # last round's tail was larger
    ctx = LocalContext("c", 2, 0, 0.1, slot, _NoTraining(), [], state, {}, {})
    out = local.fit(ctx, received)
    assert int(state[RANK]) == 2 and out.metrics["rank"] == 2
    assert params[A][2:].abs().sum() == 0 and params[B][:, 2:].abs().sum() == 0   # pruned to zeros
    torch.testing.assert_close(out.update[A][2:], -received[A][2:])
    # next round: the pruned components are zeroed again before training, the rank stays
    with torch.no_grad():
        params[A].copy_(received[A])
        params[B].copy_(received[B])
    local.fit(LocalContext("c", 3, 0, 0.1, slot, _NoTraining(), [], state, {}, {}), received)
    assert params[A][2:].abs().sum() == 0 and int(state[RANK]) <= 2


def test_flexlora_at_mixed_ranks_uses_each_clients_scale(lora_model):
    """Two clients of ranks 1 and 2 (α=8, r=4): FlexLoRA's global ΔW is the mean of their real ΔW =
    (α/r_k)·B_k·A_k, and the rank-1 client then receives its best rank-1 approximation."""
    slot = AdapterSlot(lora_model)
    layer = _layer(lora_model)
    g = torch.Generator().manual_seed(1)
    full = RankSlot(slot, 4, 4, 8.0)
    global_state = full.get()
    real, wire = [], []
    for rank in (1, 2):   # the mean of the products has rank <= 3 <= 4: the global is exact
        s = RankSlot(slot, rank, 4, 8.0)
        s.set({n: torch.randn(t.shape, generator=g) for n, t in s.get().items()})
        wire.append(s.get())
        real.append({n: layer.scaling["default"] * (slot.params[n.replace("lora_A", "lora_B")].detach()
                                                   @ slot.params[n].detach())
                     for n in slot.params if ".lora_A." in n})
    updates = [ClientUpdate(f"c{i}", {k: w[k] - truncate(global_state, w[k].shape[0] if ".lora_A." in k
                                                         else w[k].shape[1])[k] for k in w}, 1)
               for i, w in enumerate(wire)]
    out = FlexLoRA(FlexLoRAConfig(weighting="uniform")).aggregate_fit(1, global_state, updates)
    full.set(out)
    for a_name in real[0]:
        b_name = a_name.replace("lora_A", "lora_B")
        merged = layer.scaling["default"] * (slot.params[b_name].detach() @ slot.params[a_name].detach())
        mean = 0.5 * (real[0][a_name] + real[1][a_name])
        torch.testing.assert_close(merged.double(), mean.double(), atol=1e-5, rtol=1e-4)
    one = RankSlot(slot, 1, 4, 8.0)
    one.set(truncate(out, 1))
    for a_name in real[0]:
        b_name = a_name.replace("lora_A", "lora_B")
        got = layer.scaling["default"] * (slot.params[b_name].detach() @ slot.params[a_name].detach())
        u, s, vh = torch.linalg.svd(0.5 * (real[0][a_name] + real[1][a_name]).double())
        torch.testing.assert_close(got.double(), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-4)


def test_server_expects_each_clients_own_shapes(tiny_recipe):
    recipe = _recipe(tiny_recipe, federation__algorithm="hetlora", adapter__rank_per_client=[1, 2, 4])
    global_state = {A: torch.zeros(4, 3), B: torch.zeros(5, 4), "norm": torch.zeros(3)}
    shapes = ClientShapes(recipe, global_state, CompressionConfig(), CompressionConfig())
    sent = shapes.down("client_1", global_state)
    assert sent[A].shape == (2, 3) and sent[B].shape == (5, 2) and sent["norm"].shape == (3,)
    wire = shapes.up("client_1").wire
    good = Message(MessageKind.UPDATE, 1, "client_1", "server", tensors=dict(sent))
    check_message(good, kinds={MessageKind.UPDATE}, round=1, tensor_specs=wire)
    full = Message(MessageKind.UPDATE, 1, "client_1", "server", tensors=dict(global_state))
    with pytest.raises(MessageError):   # the full rank from a rank-2 client is refused
        check_message(full, kinds={MessageKind.UPDATE}, round=1, tensor_specs=wire)


def test_flora_stacking_is_the_exact_weighted_sum_of_products():
    c1 = {A: T([[1, 2]]), B: T([[1], [0]])}                    # rank 1: B·A = [[1, 2], [0, 0]]
    c2 = {A: T([[0, 1], [1, 0]]), B: T([[1, 0], [0, 2]])}      # rank 2: B·A = [[0, 1], [2, 0]]
    (b_s, a_s), = stack([c1, c2], [1.0, 3.0]).values()
    assert b_s.shape == (2, 3) and a_s.shape == (3, 2)         # rank 1 + 2
    torch.testing.assert_close(b_s @ a_s, T([[0.25, 0.5 + 0.75], [1.5, 0]]))
    delta = "down/flora/m.q"
    global_state = {A: T([[5, 5], [6, 6]]), B: T([[1, 1], [1, 1]]), delta: T([[1, 0], [0, 1]])}
    out, info = flora_aggregate(global_state, [c1, c2], [1.0, 3.0])
    torch.testing.assert_close(out[delta], T([[1.25, 1.25], [1.5, 1]]))   # kept and grown
    torch.testing.assert_close(out[A], global_state[A])                    # a fresh LoRA: A as is
    assert out[B].abs().sum() == 0                                          # ... and B = 0
    assert info == {"flora_stacked_rank": 3, "flora_stacked_bytes": (6 + 6) * 8}
    # whatever the order of the state: the other tensors are the weighted mean of the clients',
    # a downlink-only tensor other than ΔW_g is passed on as the server holds it
    first = {delta: global_state[delta], "norm": T([0.0]), "down/other": T([7.0]),
             A: global_state[A], B: global_state[B]}
    out, _ = flora_aggregate(first, [{**c1, "norm": T([2.0])}, {**c2, "norm": T([4.0])}], [1.0, 3.0])
    assert list(out) == list(first)
    torch.testing.assert_close(out[delta], T([[1.25, 1.25], [1.5, 1]]))
    torch.testing.assert_close(out["norm"], T([3.5]))                        # (2 + 3·4) / 4
    torch.testing.assert_close(out["down/other"], T([7.0]))
    torch.testing.assert_close(out[A], global_state[A])
    assert out[B].abs().sum() == 0


def test_flora_party_saves_the_scaled_delta_under_the_base_models_names(tmp_path):
    from safetensors.torch import load_file

    from fedtune.algorithms.flora import DELTA_FILE, FLoRAParty

    party = FLoRAParty(SimpleNamespace(adapter=SimpleNamespace(alpha=16, r=8)))   # α/r = 2
    state = {"down/flora/base_model.model.layers.0.q_proj": T([[1.0, -2.0]]),
             "down/flora/lm_head": T([[3.0]]), A: T([[9.0, 9.0]])}
    directory = tmp_path / "final" / "adapter"   # not there yet
    for _ in range(2):   # saving again (a resumed run's end) overwrites the file
        assert party.save(state, directory) is False   # the PEFT adapter is saved as usual
    saved = load_file(str(directory / DELTA_FILE))
    assert sorted(saved) == ["layers.0.q_proj.weight", "lm_head.weight"]
    torch.testing.assert_close(saved["layers.0.q_proj.weight"], torch.tensor([[2.0, -4.0]]))
    torch.testing.assert_close(saved["lm_head.weight"], torch.tensor([[6.0]]))
    assert saved["lm_head.weight"].dtype == torch.float32


def test_flora_view_refuses_a_factor_that_is_not_on_a_lora_layer():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    slot = SimpleNamespace(model=model, params={"0.lora_A.default.weight": torch.zeros(1, 2)})
    with pytest.raises(ModelError, match=r"^flora: 0\.lora_A\.default\.weight is not a LoRA layer's "
                                         r"factor \(adapter\.method lora\)$"):
        FLoRAView(slot)


def test_flora_stacking_refuses_weights_that_do_not_sum_above_zero():
    c = {"m.lora_A.default.weight": torch.ones(1, 2), "m.lora_B.default.weight": torch.ones(2, 1)}
    for states, weights in (([], []), ([c], [0.0]), ([c, c], [1.0, -1.0]), ([c, c], [-1.0, -2.0])):
        with pytest.raises(ValueError, match="^stack needs clients with positive total weight$"):
            stack(states, weights)

def test_flora_view_writes_the_delta_into_the_base_weight(lora_model):
    slot = AdapterSlot(lora_model)
    view = FLoRAView(slot)
    state = view.initial()
    name = next(k for k in state if k.startswith("down/flora/") and "layers.0." in k)
    module = dict(lora_model.named_modules())[name.removeprefix("down/flora/")]
    w0 = module.base_layer.weight.detach().clone()
    state[name] = torch.full_like(state[name], 0.25)
    view.load(state)
    torch.testing.assert_close(module.base_layer.weight.detach(), w0 + (8.0 / 4) * 0.25)
    view.load(state)   # loading again does not add the delta twice
    torch.testing.assert_close(module.base_layer.weight.detach(), w0 + (8.0 / 4) * 0.25)
    state[name].zero_()
    view.load(state)
    torch.testing.assert_close(module.base_layer.weight.detach(), w0)        # W0, not W0 + old deltas


def test_a_deployed_clients_own_rank_model_holds_the_same_adapter(tiny_model_dir):
    """A deployed client builds its LoRA at its own rank (its memory), not at adapter.r: the same
    wire tensors give it the same real ΔW and come back unchanged."""
    from transformers import AutoModelForCausalLM

    from fedtune.config.schema import AdapterSection

    models = []
    for r in (4, 2):
        section = AdapterSection(method="lora", r=r, alpha=8.0, dropout=0.0, target_modules=["q_proj"])
        models.append(attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), section))
    shared, own = (RankSlot(AdapterSlot(m), rank=2, r_max=4, alpha=8.0) for m in models)
    assert own.model_rank == 2 and shared.model_rank == 4
    assert sum(p.numel() for p in own.params.values()) * 2 == sum(p.numel() for p in shared.params.values())
    g = torch.Generator().manual_seed(3)
    wire = {n: torch.randn(t.shape, generator=g) for n, t in shared.get().items()}
    assert {n: t.shape for n, t in own.get().items()} == {n: t.shape for n, t in wire.items()}
    shared.set(wire)
    own.set(wire)
    for slot in (shared, own):
        torch.testing.assert_close(slot.get(), wire)
    la, lb = _layer(models[0]), _layer(models[1])
    real = [layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
            for layer in (la, lb)]
    torch.testing.assert_close(real[0], real[1])
    assert own.frame_scale == shared.frame_scale == 8.0 / 4


def test_hetlora_aggregation_pads_to_the_rank_not_the_input_width():
    """Rank 2 with 3 inputs (A is 2 x 3): the rank-1 client is padded to 2 rows, not 3."""
    global_state = {A: T([[0, 0, 0], [0, 0, 0]]), B: T([[0, 0]])}
    c1 = {A: T([[1, 0, 0]]), B: T([[3]])}                          # rank 1
    c2 = {A: T([[0, 1, 0], [0, 0, 1]]), B: T([[0, 4]])}            # rank 2
    out = hetlora_aggregate(global_state, [c1, c2], [1.0, 3.0])      # weights 1/4, 3/4
    torch.testing.assert_close(out[A], T([[0.25, 0.75, 0], [0, 0, 0.75]]))
    torch.testing.assert_close(out[B], T([[0.75, 3.0]]))
    # a state without LoRA factors: the plain weighted mean
    out = hetlora_aggregate({"w": T([0, 0])}, [{"w": T([1, 2])}, {"w": T([3, 6])}], [1.0, 3.0])
    torch.testing.assert_close(out["w"], T([2.5, 5.0]))


def test_hetlora_weighting_by_examples_and_the_weights_reported():
    global_state = {A: T([[1, 0], [0, 1]]), B: T([[1, 1]])}
    u1 = ClientUpdate("c1", {A: T([[0, 1]]), B: T([[1]])}, 1)                 # local A [[1,1]], B [[2]]
    u2 = ClientUpdate("c2", {A: T([[0, 0], [0, 0]]), B: T([[0, 0]])}, 3)      # local = global
    strategy = HetLoRA(HetLoRAConfig(weighting="examples"))
    out = strategy.aggregate_fit(1, global_state, [u1, u2])                    # weights 1/4, 3/4
    torch.testing.assert_close(out[A], T([[1, 0.25], [0, 0.75]]))
    torch.testing.assert_close(out[B], T([[1.25, 0.75]]))
    assert strategy.round_metrics() == {"hetlora_weights": {"c1": 0.25, "c2": 0.75}}


class _Recording:
    def __init__(self):
        self.extra = []

    def train(self, examples, *, lr, seed, extra_loss=None):
        self.extra.append(extra_loss)
        return SimpleNamespace(loss=1.0, steps=1, examples=1, seconds=0.0, dp=None)


def test_hetlora_without_regulariser_trains_plainly():
    """reg 0 hands the trainer no extra term (plain local training); reg 0.1 hands it
    0.1·‖B[:, 1:2]‖·‖A[1:2]‖ = 0.1 at rank 2, γ = 0.5."""
    for reg, expected in ((0.0, None), (0.1, 0.1)):
        params = {A: T([[1, 0], [0, 1]]).requires_grad_(True), B: T([[1, 1]]).requires_grad_(True)}
        slot = SimpleNamespace(params=params, get=lambda p=params: {k: v.detach().clone() for k, v in p.items()})
        trainer = _Recording()
        received = {k: v.detach().clone() for k, v in params.items()}
        HetLoRALocal(HetLoRAConfig(reg=reg, gamma=0.5)).fit(
            LocalContext("c", 1, 0, 0.1, slot, trainer, [], {}, {}, {}), received)
        [extra] = trainer.extra
        if expected is None:
            assert extra is None
        else:
            assert extra().item() == pytest.approx(expected)


def test_a_resource_rule_needs_one_resource_per_client(tiny_recipe):
    rule = {"ranks": [4, 2], "resources": [1.0, 2.0]}
    with pytest.raises(RecipeError, match=r"adapter\.rank_per_client\.resources: 2 entries for "
                                          r"federation\.clients=3"):
        _recipe(tiny_recipe, federation__algorithm="hetlora", adapter__rank_per_client=rule)


def test_norm_weights_when_every_product_is_zero_and_when_the_norms_are_small():
    zero = {A: T([[1, 0]]), B: T([[0]])}                                # B·A = 0
    assert norm_weights([zero, zero]) == [0.5, 0.5]
    assert norm_weights([zero, zero, zero, zero]) == [0.25] * 4
    small = [{A: T([[0.1, 0]]), B: T([[1]])}, {A: T([[0, 0.3]]), B: T([[1]])}]   # norms 0.1, 0.3
    assert norm_weights(small) == pytest.approx([0.25, 0.75], rel=1e-12)


def test_hetlora_aggregate_refusals_and_the_global_dtype():
    with pytest.raises(ValueError, match="^hetlora_aggregate needs at least one client$"):
        hetlora_aggregate({"w": T([0])}, [], [])
    for weights in ([0.0, 0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="^hetlora_aggregate: the weights must sum to a positive number$"):
            hetlora_aggregate({"w": T([0])}, [{"w": T([1])}, {"w": T([3])}], weights)
    out = hetlora_aggregate({"w": torch.zeros(1)}, [{"w": torch.ones(1)}, {"w": torch.full((1,), 3.0)}], [1.0, 1.0])
    assert out["w"].dtype == torch.float32 and out["w"].tolist() == [2.0]


def test_hetlora_strategy_weights_by_the_norm_of_each_product():
    """Global A = 0, B = 0 at rank 2; c1 (rank 1) brings A [[1, 0]], B [[3]] (‖BA‖ = 3), c2 (rank 2)
    A [[0, 1], [1, 1]], B [[4, 0]] (‖BA‖ = 4): weights 3/7 and 4/7, as test_hetlora_aggregation_by_hand."""
    global_state = {A: T([[0, 0], [0, 0]]), B: T([[0, 0]])}
    strategy = HetLoRA(HetLoRAConfig())
    assert strategy.round_metrics() == {}
    u1 = ClientUpdate("c1", {A: T([[1, 0]]), B: T([[3]])}, 1)
    u2 = ClientUpdate("c2", {A: T([[0, 1], [1, 1]]), B: T([[4, 0]])}, 9)
    out = strategy.aggregate_fit(1, global_state, [u1, u2])
    torch.testing.assert_close(out[A], T([[3 / 7, 4 / 7], [4 / 7, 4 / 7]]))
    torch.testing.assert_close(out[B], T([[3 / 7 * 3 + 4 / 7 * 4, 0]]))
    assert strategy.round_metrics() == {"hetlora_weights": pytest.approx({"c1": 3 / 7, "c2": 4 / 7})}


def _hetlora_fit(local, params, state, trainer):
    slot = SimpleNamespace(params=params, get=lambda: {k: v.detach().clone() for k, v in params.items()})
    received = {k: v.detach().clone() for k, v in params.items()}
    return local.fit(LocalContext("c", 2, 17, 0.3, slot, trainer, ["x"], state, {}, {}), received), received


class _Calls:
    def __init__(self):
        self.calls = []

    def train(self, examples, *, lr, seed, extra_loss=None):
        self.calls.append((examples, lr, seed, None if extra_loss is None else float(extra_loss().detach())))
        return SimpleNamespace(loss=0.5, steps=2, examples=3, seconds=0.25, dp=None)


def test_hetlora_local_fit_by_hand():
    """Rank 4, γ = 0.5: the tail is components 2..3, ‖B[:, 2:4]‖·‖A[2:4]‖ = ‖(2, 0)‖·‖(3, 4)‖ = 10.
    The trainer gets the client's examples, lr and seed and the term 0.1·10; a tail equal to last
    round's is no shrink: the rank stays. At rank 2 (from the client's state) a tail that shrank
    prunes to ⌊0.5·2⌋ = 1."""
    local = HetLoRALocal(HetLoRAConfig(reg=0.1, gamma=0.5))
    params = {A: T([[1, 0], [0, 1], [3, 4], [0, 0]]).requires_grad_(True),
              B: T([[1, 1, 2, 0]]).requires_grad_(True)}
    state = {TAIL: torch.tensor(10.0, dtype=torch.float64)}
    trainer = _Calls()
    out, _ = _hetlora_fit(local, params, state, trainer)
    assert trainer.calls == [(["x"], 0.3, 17, pytest.approx(1.0))]
    assert out.metrics == {"train_loss": 0.5, "steps": 2, "examples_seen": 3, "train_seconds": 0.25,
                           "rank": 4, "tail_norm": pytest.approx(10.0)}
    assert int(state[RANK]) == 4 and state[TAIL].dtype == torch.float64 and float(state[TAIL]) == pytest.approx(10.0)
    assert params[A][2:].abs().sum() > 0                                    # nothing pruned

    # rank 2: components 2.. zeroed before training; tail ‖B[:, 1:2]‖·‖A[1:2]‖ = 1·1 < 5: prune to 1
    state = {RANK: torch.tensor(2), TAIL: torch.tensor(5.0, dtype=torch.float64)}
    trainer = _Calls()
    out, received = _hetlora_fit(local, params, state, trainer)
    assert trainer.calls == [(["x"], 0.3, 17, pytest.approx(0.1))]
    assert out.metrics["rank"] == 1 and int(state[RANK]) == 1 and out.metrics["tail_norm"] == pytest.approx(1.0)
    assert params[A][1:].abs().sum() == 0 and params[B][:, 1:].abs().sum() == 0
    torch.testing.assert_close(out.update[A], T([[0, 0], [0, -1], [-3, -4], [0, 0]]))


class _Noisy:
    """A trainer that moves every component, those beyond the client's rank too (as DP-SGD's noise,
    added to every trainable parameter's gradient, does)."""

    def train(self, examples, *, lr, seed, extra_loss=None):
        with torch.no_grad():
            for p in self.params.values():
                p.add_(0.5)
        return SimpleNamespace(loss=1.0, steps=1, examples=1, seconds=0.0, dp=None)


def test_components_pruned_earlier_are_sent_as_zeros_even_when_training_moved_them():
    """A client at rank 2 of 4 (pruned in an earlier round), its tail not shrinking this round:
    components 2..3 are zero in its model and update whatever the training did to them."""
    params = {A: T([[1, 0], [0, 1], [0, 0], [0, 0]]).requires_grad_(True),
              B: T([[1, 1, 0, 0]]).requires_grad_(True)}
    trainer = _Noisy()
    trainer.params = params
    state = {RANK: torch.tensor(2), TAIL: torch.tensor(0.0, dtype=torch.float64)}
    global_state = {A: T([[1, 0], [0, 1], [7, 7], [7, 7]]), B: T([[1, 1, 7, 7]])}
    slot = SimpleNamespace(params=params, get=lambda: {k: v.detach().clone() for k, v in params.items()})
    out = HetLoRALocal(HetLoRAConfig(reg=0.0, gamma=0.5)).fit(
        LocalContext("c", 3, 0, 0.1, slot, trainer, [], state, {}, {}), global_state)
    assert int(state[RANK]) == 2
    assert params[A][2:].abs().sum() == 0 and params[B][:, 2:].abs().sum() == 0
    torch.testing.assert_close(out.update[A], T([[0.5, 0.5], [0.5, 0.5], [-7, -7], [-7, -7]]))
    torch.testing.assert_close(out.update[B], T([[0.5, 0.5, -7, -7]]))
