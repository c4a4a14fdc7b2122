"""Personalised FL on the hand-computable tiny federation (tests/unit/tiny_federation.py): each
method's first rounds in plain floats from its update rule, what travels (names and bytes), the
personal models reported beside the global one, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_federation import LogitModel, LoraLogitModel, examples, federation, recipe, sgd, sigmoid

from conftest import LossEvaluator
from fedtune.seeding import derive_seed
from fedtune.transport.codec import decode
from fedtune.wire import Message, MessageKind

ETA = 1.0


def _loss(w: float, answers: list[int]) -> float:
    return sum(math.log1p(math.exp(w)) - y * w for y in answers) / len(answers)


TRAIN = {"client_0": examples(0, [1, 1]), "client_1": examples(0, [0, 0])}   # f = 1 and f = 0
TEST = {"client_0": (examples(0, [1, 1, 0]), [None] * 3), "client_1": (examples(0, [0, 0, 1]), [None] * 3)}


def _fed(tmp_path, algorithm, model, options=None, **kw):
    r = recipe(algorithm, 2, options=options or {}, lr=ETA, tmp=tmp_path, **kw)
    fed = federation(r, model, TRAIN, tmp=tmp_path, evaluator=LossEvaluator(model), test=TEST)
    fed.transport.sent = []   # every message both ways, decoded from the bytes that travelled
    for name, endpoint in list(fed.transport.endpoints.items()):
        fed.transport.endpoints[name] = _recording(endpoint, fed.transport.sent)
    return fed


def _recording(endpoint, sent):
    def deliver(data: bytes):
        sent.append(decode(data))
        reply = endpoint(data)
        if reply is not None:
            sent.append(decode(reply))
        return reply
    return deliver


def _evaluate(fed, name):
    tensors = fed.server.down.pack(fed.server.global_state)
    reply = fed.clients[name].evaluate(Message(MessageKind.EVALUATE, 9, "server", name, tensors=tensors))
    return reply.meta["metrics"]


def _sent_names(fed, kind):
    """The tensor names of every message of `kind` the transport carried (decoded from bytes)."""
    return {n for msg in fed.transport.sent if msg.kind == kind for n in msg.tensors}


# -- Ditto -----------------------------------------------------------------------------------

def test_ditto_two_rounds_by_hand(tmp_path):
    lam = 0.5
    model = LogitModel([0.0, 0.0])
    fed = _fed(tmp_path, "ditto", model, {"lam": lam})
    fed.round(1)
    # global: each client one SGD step from w=0; f=1 and f=0 average to 0 (equal weights)
    w_a, w_b = sgd(0.0, 1.0, ETA), sgd(0.0, 0.0, ETA)
    assert fed.server.global_state["w"][0].item() == pytest.approx((w_a + w_b) / 2, abs=1e-6)
    # personal: from w^t = 0, the proximal gradient is 0 in the first step
    v_a, v_b = w_a, w_b
    state = fed.clients["client_0"].state
    assert state["personal/w"][0].item() == pytest.approx(v_a, abs=1e-6)
    fed.round(2)
    w1 = (w_a + w_b) / 2
    v_a2 = v_a - ETA * (sigmoid(v_a) - 1.0 + lam * (v_a - w1))
    v_b2 = v_b - ETA * (sigmoid(v_b) - 0.0 + lam * (v_b - w1))
    assert fed.clients["client_0"].state["personal/w"][0].item() == pytest.approx(v_a2, abs=1e-6)
    assert fed.clients["client_1"].state["personal/w"][0].item() == pytest.approx(v_b2, abs=1e-6)
    w2 = (sgd(w1, 1.0, ETA) + sgd(w1, 0.0, ETA)) / 2
    assert fed.server.global_state["w"][0].item() == pytest.approx(w2, abs=1e-6)
    metrics = _evaluate(fed, "client_0")
    assert metrics["loss"] == pytest.approx(_loss(w2, [1, 1, 0]), abs=1e-5)
    assert metrics["personal_loss"] == pytest.approx(_loss(v_a2, [1, 1, 0]), abs=1e-5)
    # the personal adapter never travels: updates hold the global delta, named like the adapter
    assert _sent_names(fed, MessageKind.UPDATE) == {"w"}


def test_ditto_resume_is_exact(tmp_path):
    def build(sub):
        model = LogitModel([0.0, 0.0])
        return _fed(tmp_path / sub, "ditto", model, {"lam": 0.3})

    straight = build("a")
    for r in (1, 2, 3):
        straight.round(r)
    first = build("b")
    first.round(1)
    first.round(2)
    first.server.checkpoint(2)
    resumed = build("c")
    assert resumed.server.restore(first.run_dir.latest_checkpoint()) == 3
    assert torch.equal(resumed.clients["client_0"].state["personal/w"],
                       first.clients["client_0"].state["personal/w"])
    resumed.round(3)
    assert torch.equal(resumed.server.global_state["w"], straight.server.global_state["w"])
    for name in TRAIN:
        assert torch.equal(resumed.clients[name].state["personal/w"], straight.clients[name].state["personal/w"])


# -- FedAvg + FT -----------------------------------------------------------------------------

def test_fedavg_ft_fine_tunes_a_copy_before_evaluating(tmp_path):
    model = LogitModel([0.0, 0.0])
    fed = _fed(tmp_path, "fedavg_ft", model, {"ft_steps": 2, "ft_lr": 0.5})
    fed.round(1)
    w1 = (sgd(0.0, 1.0, ETA) + sgd(0.0, 0.0, ETA)) / 2
    metrics = _evaluate(fed, "client_0")
    assert metrics["loss"] == pytest.approx(_loss(w1, [1, 1, 0]), abs=1e-6)
    assert metrics["personal_loss"] == pytest.approx(_loss(sgd(w1, 1.0, 0.5, steps=2), [1, 1, 0]), abs=1e-5)
    assert fed.clients["client_0"].state == {}     # nothing carried into the next round
    fed.round(2)                                  # trains from the global model, not the FT one
    w2 = (sgd(w1, 1.0, ETA) + sgd(w1, 0.0, ETA)) / 2
    assert fed.server.global_state["w"][0].item() == pytest.approx(w2, abs=1e-6)


# -- pFedMe ----------------------------------------------------------------------------------

def test_pfedme_one_round_by_hand(tmp_path):
    lam, k, plr, beta = 2.0, 2, 0.5, 1.5
    model = LogitModel([0.0, 0.0])
    fed = _fed(tmp_path, "pfedme", model, {"lam": lam, "inner_steps": k, "personal_lr": plr, "beta": beta},
               train__lr=0.1)
    fed.round(1)
    eta = 0.1
    news = {}
    for name, f in (("client_0", 1.0), ("client_1", 0.0)):
        w, theta = 0.0, 0.0
        for _ in range(k):
            theta = theta - plr * (sigmoid(theta) - f + lam * (theta - w))
        w = w - eta * lam * (w - theta)
        news[name] = w
        assert fed.clients[name].state["personal/w"][0].item() == pytest.approx(theta, abs=1e-6)
    expected = 0.0 + beta * ((news["client_0"] - 0.0) + (news["client_1"] - 0.0)) / 2
    assert fed.server.global_state["w"][0].item() == pytest.approx(expected, abs=1e-6)


# -- LoRA splits: FedSA-LoRA, FFA-LoRA, FedRep ----------------------------------------------

A_NAME, B_NAME = "proj.lora_A.default", "proj.lora_B.default"
A0, B0 = 0.8, 0.5


def _lora():
    return LoraLogitModel([[A0, 0.0]], [[B0]])


def _step_a(a, b, f):
    return a - ETA * b * (sigmoid(a * b) - f)


def _step_b(a, b, f):
    return b - ETA * a * (sigmoid(a * b) - f)


def test_fedsa_lora_shares_a_keeps_b(tmp_path):
    model = _lora()
    fed = _fed(tmp_path, "fedsa_lora", model, adapter={"method": "lora"})
    assert set(fed.server.global_state) == {A_NAME}
    fed.round(1)
    # jointly, from (A0, B0) for each client: one SGD step on both factors
    a = {n: _step_a(A0, B0, f) for n, f in (("client_0", 1.0), ("client_1", 0.0))}
    b = {n: _step_b(A0, B0, f) for n, f in (("client_0", 1.0), ("client_1", 0.0))}
    a1 = (a["client_0"] + a["client_1"]) / 2
    assert fed.server.global_state[A_NAME][0, 0].item() == pytest.approx(a1, abs=1e-6)
    for name in TRAIN:
        assert fed.clients[name].state["personal/" + B_NAME][0, 0].item() == pytest.approx(b[name], abs=1e-6)
    fed.round(2)   # each client restarts from the global A and ITS OWN B (not the last client's)
    a2 = (_step_a(a1, b["client_0"], 1.0) + _step_a(a1, b["client_1"], 0.0)) / 2
    assert fed.server.global_state[A_NAME][0, 0].item() == pytest.approx(a2, abs=1e-6)
    b2 = _step_b(a1, b["client_1"], 0.0)
    assert fed.clients["client_1"].state["personal/" + B_NAME][0, 0].item() == pytest.approx(b2, abs=1e-6)
    metrics = _evaluate(fed, "client_1")
    assert metrics["loss"] == pytest.approx(_loss(a2 * B0, [0, 0, 1]), abs=1e-5)   # global: initial B
    assert metrics["personal_loss"] == pytest.approx(_loss(a2 * b2, [0, 0, 1]), abs=1e-5)
    # B never travels, in either direction
    assert _sent_names(fed, MessageKind.UPDATE) == {A_NAME}
    assert _sent_names(fed, MessageKind.FIT) == {A_NAME}


def test_ffa_lora_freezes_a_and_shares_b(tmp_path):
    model = _lora()
    fed = _fed(tmp_path, "ffa_lora", model, adapter={"method": "lora"})
    assert set(fed.server.global_state) == {B_NAME}
    fed.round(1)
    b1 = (_step_b(A0, B0, 1.0) + _step_b(A0, B0, 0.0)) / 2
    assert fed.server.global_state[B_NAME][0, 0].item() == pytest.approx(b1, abs=1e-6)
    assert model.proj.lora_A["default"][0, 0].item() == pytest.approx(A0)   # frozen
    fed.round(2)
    b2 = (_step_b(A0, b1, 1.0) + _step_b(A0, b1, 0.0)) / 2
    assert fed.server.global_state[B_NAME][0, 0].item() == pytest.approx(b2, abs=1e-6)
    assert _sent_names(fed, MessageKind.UPDATE) == {B_NAME}
    ups = [len(m.tensors[B_NAME].numpy().tobytes()) for m in fed.transport.sent if m.kind == MessageKind.UPDATE]
    assert ups == [4] * 4    # one float32 of B per update, A never sent


def test_fedrep_alternates_personal_then_shared(tmp_path):
    model = _lora()
    fed = _fed(tmp_path, "fedrep", model, {"personal": ["lora_B"]}, adapter={"method": "lora"})
    fed.round(1)
    expected_a = []
    for name, f in (("client_0", 1.0), ("client_1", 0.0)):
        b = _step_b(A0, B0, f)            # personal part first, shared frozen
        a = _step_a(A0, b, f)             # then the shared part with the new personal part
        expected_a.append(a)
        assert fed.clients[name].state["personal/" + B_NAME][0, 0].item() == pytest.approx(b, abs=1e-6)
    assert fed.server.global_state[A_NAME][0, 0].item() == pytest.approx(sum(expected_a) / 2, abs=1e-6)
    assert _sent_names(fed, MessageKind.UPDATE) == {A_NAME}
    assert model.proj.lora_A["default"].requires_grad and model.proj.lora_B["default"].requires_grad


def test_fedrep_top_layer_default_and_bad_split(tmp_path):
    from fedtune.algorithms.fedrep import fedrep_personal
    from fedtune.algorithms.options import FedRepConfig
    from fedtune.errors import ModelError

    names = [f"model.layers.{i}.q_proj.lora_{x}.default.weight" for i in range(3) for x in "AB"]
    assert fedrep_personal(FedRepConfig(), names) == set(names[4:])
    assert fedrep_personal(FedRepConfig(top_layers=2), names) == set(names[2:])
    with pytest.raises(ModelError, match="federation.options.personal: matches no trainable"):
        fedrep_personal(FedRepConfig(personal=["nothing"]), names)
    with pytest.raises(ModelError, match="nothing would be shared"):
        fedrep_personal(FedRepConfig(top_layers=3), names)
    with pytest.raises(ModelError, match="no trainable tensor has a layer number in its name"):
        fedrep_personal(FedRepConfig(), ["lm_head.lora_A.default.weight", "norm.weight"])


def test_layer_index_reads_the_layer_number_of_a_name():
    from fedtune.algorithms.personal import layer_index

    assert layer_index("model.layers.12.self_attn.q_proj.lora_A.default.weight") == 12
    assert layer_index("lm_head.weight") is None


def test_a_partial_view_refuses_a_shared_state_that_does_not_match_in_words():
    from fedtune.algorithms.personal import PartialView
    from fedtune.errors import ModelError
    from fedtune.models.adapters import AdapterSlot

    view = PartialView(AdapterSlot(LoraLogitModel([[0.1, 0.2]], [[0.3]])), {"proj.lora_B.default"})
    assert list(view.initial()) == ["proj.lora_A.default"]
    a = torch.zeros(1, 2)
    with pytest.raises(ModelError, match=r"^shared adapter state does not match: missing \[\], "
                                         r"unexpected \['x', 'y'\]$"):
        view.load({"proj.lora_A.default": a, "y": a, "x": a})
    with pytest.raises(ModelError, match=r"missing \['proj.lora_A.default'\], unexpected \[\]$"):
        view.load({})


# -- pFedGate --------------------------------------------------------------------------------

class TwoLoraModel(torch.nn.Module):
    """Logits (0, (B_p·A_p + B_q·A_q)[0, t]) at token t: two LoRA blocks of 3 numbers each, and a
    frozen one-dimensional embedding of 1.0 for every token (the gate's input is then 1.0)."""

    def __init__(self, p: tuple[float, float], q: tuple[float, float]):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 1)
        self.emb.weight.data.fill_(1.0)
        self.emb.weight.requires_grad_(False)
        for name, (a, b) in (("p", p), ("q", q)):
            m = torch.nn.Module()
            m.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor([[a, 0.0]]))})
            m.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.tensor([[b]]))})
            setattr(self, name, m)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        w = sum(getattr(self, n).lora_B["default"] @ getattr(self, n).lora_A["default"] for n in "pq")[0]
        one = w[input_ids]
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(one), one], dim=-1))


def _gate_scores(gate_state: dict, floor: float) -> list[float]:
    w, b = gate_state["linear.weight"][:, 0], gate_state["linear.bias"]
    return [max(sigmoid(float(w[i]) + float(b[i])), floor) for i in range(2)]


def test_pfedgate_one_round_by_hand(tmp_path):
    from fedtune.algorithms.pfedgate import Gate
    from fedtune.seeding import derive_seed

    (ap, bp), (aq, bq) = (0.8, 0.5), (-0.4, 0.3)
    model = TwoLoraModel((ap, bp), (aq, bq))
    fed = _fed(tmp_path, "pfedgate", model, {"sparsity": 0.5, "gate_lr": 0.5}, adapter={"method": "lora"})
    names = ["p.lora_A.default", "p.lora_B.default", "q.lora_A.default", "q.lora_B.default"]
    assert list(fed.server.global_state) == names
    fed.round(1)
    new = {n: [] for n in names}
    for name, f in (("client_0", 1.0), ("client_1", 0.0)):
        torch.manual_seed(derive_seed(derive_seed(5, "fit", 1, name), "pfedgate-init"))
        init = Gate(1, 2, floor=0.1).state_dict()
        g = _gate_scores(init, 0.1)
        keep = [g[0] >= g[1], g[1] > g[0]]       # budget 3 of 6: the higher-scoring block only
        s = [g[i] * keep[i] for i in range(2)]
        w0 = s[0] * bp * ap + s[1] * bq * aq
        err = sigmoid(w0) - f
        new["p.lora_A.default"].append(ap - ETA * err * s[0] * bp)
        new["p.lora_B.default"].append(bp - ETA * err * s[0] * ap)
        new["q.lora_A.default"].append(aq - ETA * err * s[1] * bq)
        new["q.lora_B.default"].append(bq - ETA * err * s[1] * aq)
        kept = {k[len("personal/gate."):]: v for k, v in fed.clients[name].state.items()}
        assert set(kept) == {"linear.weight", "linear.bias"}
        assert not torch.equal(kept["linear.bias"], init["linear.bias"])   # the gate learned
    for n in names:
        got = fed.server.global_state[n].flatten()[0].item()
        assert got == pytest.approx(sum(new[n]) / 2, abs=1e-6), n
    assert _sent_names(fed, MessageKind.UPDATE) == set(names)       # the gate never travels
    # the personal model: each B scaled by the client's gate over its data (knapsack applied)
    gate = {k[len("personal/gate."):]: v for k, v in fed.clients["client_0"].state.items()}
    g = _gate_scores(gate, 0.1)
    s = [g[0] if g[0] >= g[1] else 0.0, g[1] if g[1] > g[0] else 0.0]
    glob = {n: fed.server.global_state[n].flatten() for n in names}
    w0 = (s[0] * glob["p.lora_B.default"][0] * glob["p.lora_A.default"][0]
          + s[1] * glob["q.lora_B.default"][0] * glob["q.lora_A.default"][0]).item()
    metrics = _evaluate(fed, "client_0")
    assert metrics["personal_loss"] == pytest.approx(_loss(w0, [1, 1, 0]), abs=1e-5)


def test_knapsack_keeps_the_best_blocks_that_fit():
    from fedtune.algorithms.pfedgate import knapsack_keep

    assert knapsack_keep([0.2, 0.9, 0.5], [3, 3, 3], 6) == [False, True, True]
    assert knapsack_keep([0.2, 0.9, 0.5], [3, 3, 3], 4.5) == [False, True, False]
    assert knapsack_keep([0.2, 0.9, 0.5], [3, 10, 3], 1) == [False, True, False]   # never empty
    assert knapsack_keep([0.9, 0.8, 0.1], [1, 5, 1], 2) == [True, False, True]


# -- holdout (unseen) clients ------------------------------------------------------------------

def test_a_holdout_client_never_trains_and_adapts_the_global_model(tmp_path):
    from fedtune.algorithms.personal import HoldoutLocal

    model = LogitModel([0.0, 0.0])
    fed = _fed(tmp_path, "fedavg", model, federation__holdout_clients=["client_1"],
               federation__holdout_steps=2, eval={"clients": True})
    unseen = fed.clients["client_1"]
    unseen.local = HoldoutLocal(unseen.local, steps=2)
    assert fed.server.training == ["client_0"]
    fed.round(1)
    fed.round(2)
    w2 = sgd(sgd(0.0, 1.0, ETA), 1.0, ETA)      # client_0 alone trains
    assert fed.server.global_state["w"][0].item() == pytest.approx(w2, abs=1e-6)
    assert _sent_names(fed, MessageKind.UPDATE) == {"w"}
    assert {m.sender for m in fed.transport.sent if m.kind == MessageKind.UPDATE} == {"client_0"}
    metrics = _evaluate(fed, "client_1")
    assert metrics["loss"] == pytest.approx(_loss(w2, [0, 0, 1]), abs=1e-5)
    adapted = sgd(w2, 0.0, ETA, steps=2)         # its own data (f = 0) at train.lr, 2 steps
    assert metrics["personal_loss"] == pytest.approx(_loss(adapted, [0, 0, 1]), abs=1e-5)
    assert unseen.state == {}


def test_holdout_settings_are_checked_at_load_time():
    from fedtune.config import load_recipe
    from fedtune.errors import RecipeError

    for bad, message in ((["client_7"], "holdout_clients \\['client_7'\\] are not clients"),
                         (3, "leaves no client to train"),
                         (["client_0", "client_0"], "listed twice")):
        with pytest.raises(RecipeError, match=message):
            load_recipe({"federation": {"clients": 3, "holdout_clients": bad}})
    with pytest.raises(RecipeError, match="set eval.clients: true"):
        load_recipe({"federation": {"clients": 3, "holdout_clients": 1}, "eval": {"clients": False}})
    with pytest.raises(RecipeError, match="at most the 2 clients that train"):
        load_recipe({"federation": {"clients": 3, "holdout_clients": 1, "clients_per_round": 3}})
    fed = load_recipe({"federation": {"clients": 4, "holdout_clients": 1, "sample_fraction": 0.5}}).federation
    assert fed.holdout_names() == ["client_3"] and fed.per_round() == 2   # round(0.5 × 3 training)


# -- personal-state helpers and pFedGate's gate, by hand -------------------------------------------

def test_a_partial_view_names_at_most_three_unexpected_tensors():
    from fedtune.algorithms.personal import PartialView
    from fedtune.errors import ModelError
    from fedtune.models.adapters import AdapterSlot

    view = PartialView(AdapterSlot(LoraLogitModel([[0.1, 0.2]], [[0.3]])), {"proj.lora_B.default"})
    a = torch.zeros(1, 2)
    with pytest.raises(ModelError, match=r"unexpected \['a', 'b', 'c'\]$"):
        view.load({"proj.lora_A.default": a, **{k: a for k in "edcba"}})


def test_kept_personal_tensors_are_copies_the_live_adapter_cannot_change():
    from fedtune.algorithms.personal import keep_personal, personal_part

    live = torch.tensor([1.0, 2.0])
    state = {"personal/old": torch.zeros(1), "scaffold/c": torch.ones(1)}
    keep_personal(state, {"w": live})
    with torch.no_grad():
        live.add_(10.0)           # the next client's training writes the shared adapter in place
    assert set(state) == {"personal/w", "scaffold/c"}
    assert personal_part(state)["w"].tolist() == [1.0, 2.0]


def test_pooled_embeddings_average_only_the_real_tokens():
    from fedtune.algorithms.pfedgate import pooled_embeddings

    model = TwoLoraModel((1.0, 1.0), (1.0, 1.0))
    model.emb.weight.data = torch.tensor([[1.0], [3.0]])
    ids = torch.tensor([[1, 0, 0], [1, 0, 0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    assert pooled_embeddings(model, ids, mask)[:, 0].tolist() == [3.0, 2.0]   # 3/1, (3+1)/2
    assert pooled_embeddings(model, ids, None)[:, 0].tolist() == pytest.approx([5 / 3, 5 / 3])
    assert pooled_embeddings(model, ids, torch.zeros_like(ids))[:, 0].tolist() == [0.0, 0.0]


def test_pfedgate_personal_model_gates_over_every_training_example():
    """Gate scores sigmoid(x) for p and sigmoid(−x) for q on the pooled embedding x: examples
    [1] (x = 3), [0] (x = 1), [0, 1] (x = 2) in batches of 2; the mean over all three keeps p
    alone (budget 3 of 6 numbers), so B_p is scaled by it and B_q by 0."""
    from fedtune.algorithms.base import PersonalContext
    from fedtune.algorithms.options import PFedGateConfig
    from fedtune.algorithms.pfedgate import GATE, PFedGateLocal
    from fedtune.data.prompts import TokenizedExample
    from fedtune.models.adapters import AdapterSlot

    model = TwoLoraModel((0.8, 0.5), (-0.4, 0.3))
    model.emb.weight.data = torch.tensor([[1.0], [3.0]])
    slot = AdapterSlot(model)
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), pad_id=0,
                              section=SimpleNamespace(batch_size=2))
    train = [TokenizedExample(ids, ids) for ids in ([1], [0], [0, 1])]
    state = {GATE + "linear.weight": torch.tensor([[1.0], [-1.0]]), GATE + "linear.bias": torch.zeros(2)}
    ctx = PersonalContext("client_0", 1, 0, slot, trainer, train, state, slot.get())
    out = PFedGateLocal(PFedGateConfig(sparsity=0.5)).personal(ctx)
    g_p = (sigmoid(3.0) + sigmoid(1.0) + sigmoid(2.0)) / 3
    assert set(out) == {"p.lora_B.default", "q.lora_B.default"}
    assert out["p.lora_B.default"].item() == pytest.approx(0.5 * g_p, abs=1e-6)
    assert out["q.lora_B.default"].item() == 0.0


# -- the personal steps' own budget, seed and metrics, by hand --------------------------------------

FOUR = examples(0, [1, 0]) + examples(1, [1, 0])    # (token, answer): (0, 1) (0, 0) (1, 1) (1, 0)
FIT_SEED = derive_seed(5, "fit", 1, "client_0")     # the client's seed for round 1 (recipe seed 5)


def _one_client(tmp_path, algorithm, model, options, lr=ETA, **kw):
    r = recipe(algorithm, 1, options=options, lr=lr, tmp=tmp_path, batch_size=1, **kw)
    fed = federation(r, model, {"client_0": FOUR}, tmp=tmp_path, evaluator=LossEvaluator(model),
                     test={"client_0": (FOUR, [None] * 4)})
    fed.transport.sent = []
    fed.transport.endpoints["client_0"] = _recording(fed.transport.endpoints["client_0"], fed.transport.sent)
    return fed


def _sent_metrics(fed):
    (reply,) = [m for m in fed.transport.sent if m.kind == MessageKind.UPDATE]
    return reply.meta["metrics"]


def _order(seed: int, n: int = 4) -> list[int]:
    """The example order of local training with `seed` (train/local.py: one seeded permutation per epoch)."""
    return np.random.default_rng(seed).permutation(n).tolist()


def _token_steps(w, order, lr, lam=0.0, anchor=(0.0, 0.0)):
    """SGD with batches of one example on the logit model (plus λ/2·‖w − anchor‖²): the new w and
    the mean of the losses before each step."""
    w, losses = list(w), []
    for i in order:
        t, y = FOUR[i].input_ids[0], FOUR[i].input_ids[1]
        losses.append(math.log1p(math.exp(w[t])) - y * w[t])
        grad = [lam * (w[j] - anchor[j]) for j in range(2)]
        grad[t] += sigmoid(w[t]) - y
        w = [w[j] - lr * grad[j] for j in range(2)]
    return w, sum(losses) / len(losses)


def test_ditto_personal_steps_take_their_own_budget_rate_and_seed(tmp_path):
    """One step of the global adapter on the example the round's seed draws first; then three
    personal steps (personal_steps) at personal_lr on the examples drawn by the seed
    derive_seed(seed, "ditto-personal"), each pulled towards w^t = 0; the client reports both
    losses and sends the global update."""
    lam, plr = 0.5, 0.5
    fed = _one_client(tmp_path, "ditto", LogitModel([0.0, 0.0]),
                      {"lam": lam, "personal_steps": 3, "personal_lr": plr})
    fed.round(1)
    w1, train_loss = _token_steps([0.0, 0.0], _order(FIT_SEED)[:1], ETA)
    v1, personal_loss = _token_steps([0.0, 0.0], _order(derive_seed(FIT_SEED, "ditto-personal"))[:3], plr, lam)
    assert fed.server.global_state["w"].tolist() == pytest.approx(w1, abs=1e-6)
    assert fed.clients["client_0"].state["personal/w"].tolist() == pytest.approx(v1, abs=1e-6)
    metrics = _sent_metrics(fed)
    assert metrics["train_loss"] == pytest.approx(train_loss, abs=1e-6)
    assert metrics["personal_train_loss"] == pytest.approx(personal_loss, abs=1e-6)
    assert (metrics["steps"], metrics["examples_seen"]) == (1, 1)


class SpareLogitModel(LogitModel):
    """The logit model with one more trainable tensor that no loss reaches."""

    def __init__(self, w: list[float], spare: float):
        super().__init__(w)
        self.spare = torch.nn.Parameter(torch.tensor([spare]))


def test_ditto_without_a_pull_adds_no_proximal_term(tmp_path):
    """λ = 0: the personal steps are plain local steps. A tensor no loss reaches then gets no
    gradient at all, so weight decay leaves it alone (a proximal term of weight 0 would give it a
    zero gradient, and SGD's weight decay would shrink it by lr·decay per step)."""
    fed = _one_client(tmp_path, "ditto", SpareLogitModel([0.0, 0.0], 2.0),
                      {"lam": 0.0, "personal_steps": 2, "personal_lr": 0.5}, train__weight_decay=0.1)
    fed.round(1)
    assert fed.clients["client_0"].state["personal/spare"].tolist() == [2.0]
    assert fed.server.global_state["spare"].tolist() == [2.0]


def _mean_loss(w, exs):
    return sum(math.log1p(math.exp(w[e.input_ids[0]])) - e.input_ids[1] * w[e.input_ids[0]] for e in exs) / len(exs)


def test_pfedme_two_rounds_of_two_local_rounds_by_hand(tmp_path, monkeypatch):
    """R = 2 local rounds (train.local_steps), each on the next example of the round's seeded
    order: K = 3 steps of θ on it towards w, then w ← w − η·λ·(w − θ). θ carries over to the next
    round (from the client's state), w restarts from the global model. The reported metrics:
    the mean of the inner losses, R·K steps, R examples, the inner trainings' seconds summed
    (a clock that moves 0.25 s per reading), and the round's rate."""
    import fedtune.train.local as local_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(local_module, "time", SimpleNamespace(perf_counter=lambda: 0.25 * next(ticks)))
    lam, k, plr, eta = 2.0, 3, 0.5, 0.1
    fed = _one_client(tmp_path, "pfedme", LogitModel([0.0, 0.0]),
                      {"lam": lam, "inner_steps": k, "personal_lr": plr}, lr=eta, steps=2)
    w, theta = [0.0, 0.0], [0.0, 0.0]
    for round_ in (1, 2):
        fed.transport.sent.clear()
        fed.round(round_)
        losses = []
        for i in _order(derive_seed(5, "fit", round_, "client_0"))[:2]:
            theta, inner_loss = _token_steps(theta, [i] * k, plr, lam, anchor=w)
            losses.append(inner_loss)
            w = [w[j] - eta * lam * (w[j] - theta[j]) for j in range(2)]
        assert fed.server.global_state["w"].tolist() == pytest.approx(w, abs=1e-6)
        assert fed.clients["client_0"].state["personal/w"].tolist() == pytest.approx(theta, abs=1e-6)
        assert _sent_metrics(fed) == {"train_loss": pytest.approx(sum(losses) / 2, abs=1e-6), "steps": 6,
                                      "examples_seen": 2, "train_seconds": 0.5, "lr": eta}
    metrics = _evaluate(fed, "client_0")
    assert metrics["loss"] == pytest.approx(_mean_loss(w, FOUR), abs=1e-5)
    assert metrics["personal_loss"] == pytest.approx(_mean_loss(theta, FOUR), abs=1e-5)


class DropoutLogitModel(LogitModel):
    """The logit model with dropout (p = 0.5) on w: the masks come from the seed of each training."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        one = torch.nn.functional.dropout(self.w, 0.5, self.training)[input_ids]
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(one), one], dim=-1))


def test_pfedme_inner_steps_draw_dropout_from_their_documented_seed(tmp_path):
    """The inner training of local round r is seeded derive_seed(seed, "pfedme", r): its
    dropout masks (one per step, w's entries kept ×2 or dropped) are those torch draws from it."""
    lam, k, plr = 1.0, 6, 0.5
    fed = _one_client(tmp_path, "pfedme", DropoutLogitModel([0.3, 0.0]),
                      {"lam": lam, "inner_steps": k, "personal_lr": plr}, lr=0.1)
    fed.clients["client_0"].data.train = examples(0, [1])
    fed.round(1)
    torch.manual_seed(derive_seed(derive_seed(5, "fit", 1, "client_0"), "pfedme", 0))
    masks = [torch.nn.functional.dropout(torch.ones(2), 0.5, True)[0].item() for _ in range(k)]
    assert 0.0 in masks and 2.0 in masks
    theta = 0.3
    for m in masks:      # d/dθ of log(1 + e^{mθ}) − mθ (the answer is 1), plus λ(θ − 0.3)
        theta -= plr * (m * (sigmoid(m * theta) - 1.0) + lam * (theta - 0.3))
    assert fed.clients["client_0"].state["personal/w"][0].item() == pytest.approx(theta, abs=1e-6)


def test_fedrep_personal_then_shared_steps_take_their_own_budget_and_seed(tmp_path):
    """B personal: τ_h = 3 steps of B alone (A frozen) on the examples drawn by
    derive_seed(seed, "personal"), then the recipe's 2 steps of A alone on those drawn by the
    round's seed; each example (t, y) has the logit b·a_t. The client keeps B, sends A's update,
    reports both losses, and evaluates the global A with the initial B and with its own."""
    a0, b0 = [0.8, -0.4], 0.5
    fed = _one_client(tmp_path, "fedrep", LoraLogitModel([a0], [[b0]]), {"personal": ["lora_B"], "personal_steps": 3},
                      steps=2, adapter={"method": "lora"})
    fed.round(1)

    def steps(a, b, order, train_b):
        losses = []
        for i in order:
            t, y = FOUR[i].input_ids
            losses.append(math.log1p(math.exp(b * a[t])) - y * b * a[t])
            err = sigmoid(b * a[t]) - y
            if train_b:
                b = b - ETA * a[t] * err
            else:
                a = [a[j] - ETA * b * err * (j == t) for j in range(2)]
        return a, b, sum(losses) / len(losses)

    _, b1, personal_loss = steps(a0, b0, _order(derive_seed(FIT_SEED, "personal"))[:3], train_b=True)
    a1, _, train_loss = steps(a0, b1, _order(FIT_SEED)[:2], train_b=False)
    assert fed.server.global_state[A_NAME][0].tolist() == pytest.approx(a1, abs=1e-6)
    assert fed.clients["client_0"].state["personal/" + B_NAME].item() == pytest.approx(b1, abs=1e-6)
    metrics = _sent_metrics(fed)
    assert metrics["personal_train_loss"] == pytest.approx(personal_loss, abs=1e-6)
    assert metrics["train_loss"] == pytest.approx(train_loss, abs=1e-6)
    assert (metrics["steps"], metrics["examples_seen"]) == (2, 2)
    metrics = _evaluate(fed, "client_0")
    assert metrics["loss"] == pytest.approx(_mean_loss([b0 * a for a in a1], FOUR), abs=1e-5)
    assert metrics["personal_loss"] == pytest.approx(_mean_loss([b1 * a for a in a1], FOUR), abs=1e-5)


def test_fedrep_names_the_key_of_a_split_that_leaves_nothing_shared_or_nothing_personal():
    from fedtune.algorithms.fedrep import fedrep_personal
    from fedtune.algorithms.options import FedRepConfig
    from fedtune.errors import ModelError

    names = [f"model.layers.{i}.q_proj.lora_{x}.default.weight" for i in range(3) for x in "AB"]
    with pytest.raises(ModelError, match=r"^federation\.options\.top_layers: matches every trainable tensor; "
                                         r"nothing would be shared$"):
        fedrep_personal(FedRepConfig(top_layers=3), names)
    with pytest.raises(ModelError, match=r"^federation\.options\.personal: matches every trainable tensor; "
                                         r"nothing would be shared$"):
        fedrep_personal(FedRepConfig(personal=["lora"]), names)
    with pytest.raises(ModelError, match=re.escape(
            "federation.options.personal: matches no trainable tensor of the model (e.g. "
            "['model.layers.0.q_proj.lora_A.default.weight', 'model.layers.0.q_proj.lora_B.default.weight'])")):
        fedrep_personal(FedRepConfig(personal=["lm_head"]), names)
    assert fedrep_personal(FedRepConfig(personal=["layers.1.", "lora_B"]), names) == {
        names[1], names[2], names[3], names[5]}


@pytest.mark.parametrize("weighting,mean", [("examples", (3 * 0.4 + 1 * -0.8) / 4), ("uniform", (0.4 - 0.8) / 2)])
def test_pfedme_server_moves_beta_times_the_weighted_mean_of_the_updates(weighting, mean):
    from fedtune.algorithms import build_strategy
    from fedtune.algorithms.base import ClientUpdate

    strategy = build_strategy("pfedme", {"beta": 2.0, "weighting": weighting})
    new = strategy.aggregate_fit(1, {"w": torch.tensor([1.0])}, [
        ClientUpdate("client_0", {"w": torch.tensor([0.4])}, 3), ClientUpdate("client_1", {"w": torch.tensor([-0.8])}, 1)])
    assert new["w"].item() == pytest.approx(1.0 + 2.0 * mean, abs=1e-6)


def test_pfedme_local_rounds_follow_the_epoch_budget(tmp_path):
    """train.local_epochs 1 (no local_steps) over 4 examples in batches of 2: R = 2 local rounds,
    each of K inner steps on one batch of 2."""
    fed = _one_client(tmp_path, "pfedme", LogitModel([0.0, 0.0]), {"inner_steps": 3}, steps=None,
                      train__batch_size=2, train__local_epochs=1)
    fed.round(1)
    metrics = _sent_metrics(fed)
    assert (metrics["steps"], metrics["examples_seen"]) == (6, 4)


# -- pFedGate: the gate's own step, the gated forward, the gate built for a client ----------------

def test_pfedgate_gate_and_adapter_steps_by_hand(tmp_path):
    """One client, one full-batch step (sparsity 1: both blocks kept). With z_b = W_b·x + c_b
    (x = 1, the pooled embedding), g_b = σ(z_b) and the straight-through scale s_b = g_b·k_b
    whose derivative is k_b + g_b, the step is: the adapter by SGD at η with each B_b scaled
    by s_b; the gate by SGD at gate_lr on dL/dz_b = (σ(w) − f)·B_b·A_b·(k_b + g_b)·σ'(z_b)."""
    from fedtune.algorithms.pfedgate import Gate

    (ap, bp), (aq, bq), gate_lr, f = (0.8, 0.5), (-0.4, 0.3), 0.7, 2 / 3
    model = TwoLoraModel((ap, bp), (aq, bq))
    r = recipe("pfedgate", 1, options={"sparsity": 1.0, "gate_lr": gate_lr}, lr=ETA, tmp=tmp_path,
               adapter={"method": "lora"})
    fed = federation(r, model, {"client_0": examples(0, [1, 1, 0])}, tmp=tmp_path)
    fed.transport.sent = []
    fed.transport.endpoints["client_0"] = _recording(fed.transport.endpoints["client_0"], fed.transport.sent)
    fed.round(1)
    torch.manual_seed(derive_seed(FIT_SEED, "pfedgate-init"))
    init = Gate(1, 2, floor=0.1).state_dict()
    z = [float(init["linear.weight"][i, 0] + init["linear.bias"][i]) for i in range(2)]
    g = [sigmoid(v) for v in z]
    assert min(g) > 0.1                                       # above the floor: the gradient flows
    err = sigmoid(g[0] * bp * ap + g[1] * bq * aq) - f
    dz = [err * b * a * (1.0 + gi) * gi * (1.0 - gi) for (a, b), gi in zip(((ap, bp), (aq, bq)), g)]
    kept = fed.clients["client_0"].state
    for i in range(2):
        assert kept["personal/gate.linear.weight"][i, 0].item() == pytest.approx(
            init["linear.weight"][i, 0].item() - gate_lr * dz[i], abs=1e-6)
        assert kept["personal/gate.linear.bias"][i].item() == pytest.approx(
            init["linear.bias"][i].item() - gate_lr * dz[i], abs=1e-6)
    w0 = g[0] * bp * ap + g[1] * bq * aq
    metrics = _sent_metrics(fed)
    assert metrics["train_loss"] == pytest.approx(math.log1p(math.exp(w0)) - f * w0, abs=1e-6)
    assert (metrics["steps"], metrics["examples_seen"]) == (1, 3)
    glob = fed.server.global_state
    for (name, a, b), s in zip((("p", ap, bp), ("q", aq, bq)), g):
        assert glob[f"{name}.lora_A.default"][0].tolist() == pytest.approx([a - ETA * err * s * b, 0.0], abs=1e-6)
        assert glob[f"{name}.lora_B.default"].item() == pytest.approx(b - ETA * err * s * a, abs=1e-6)


class SpyTwoLoraModel(TwoLoraModel):
    """TwoLoraModel that records the keyword arguments of each call."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.calls.append({"attention_mask": attention_mask, "use_cache": use_cache})
        return super().forward(input_ids, attention_mask, use_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pfedgate_gated_forward_pools_real_tokens_and_passes_the_mask_on(dtype):
    """Embeddings 1 (token 0) and 3 (token 1): rows [1, pad, pad] and [0, 1, pad] pool to 3 and 2.
    Gate scores σ(x) for p, σ(−x) for q, averaged over the batch: p ≈ 0.93 is kept (budget 3 of
    6), q ≈ 0.08 is floored to 0.1 and dropped. The logit of token 0 is then g_p·B_p·A_p; the
    model gets the attention mask and the caller's keywords, and keeps the adapter's dtype."""
    from fedtune.algorithms.pfedgate import Gate, GatedModel

    model = SpyTwoLoraModel((0.8, 0.5), (-0.4, 0.3))
    model.emb.weight.data = torch.tensor([[1.0], [3.0]])
    model.to(dtype)
    gate = Gate(1, 2, floor=0.1)
    gate.load_state_dict({"linear.weight": torch.tensor([[1.0], [-1.0]]), "linear.bias": torch.zeros(2)})
    blocks = [("p.lora_A.default", "p.lora_B.default"), ("q.lora_A.default", "q.lora_B.default")]
    gated = GatedModel(model, gate, blocks, [3, 3], 3.0)
    ids, mask = torch.tensor([[1, 0, 0], [0, 1, 0]]), torch.tensor([[1, 0, 0], [1, 1, 0]])
    logits = gated(ids, mask, use_cache=False).logits
    g_p = (sigmoid(3.0) + sigmoid(2.0)) / 2
    assert logits.dtype == dtype
    assert logits[0, 1, 1].item() == pytest.approx(g_p * 0.5 * 0.8, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert logits[0, 0, 1].item() == 0.0
    assert model.calls[-1]["attention_mask"] is mask and model.calls[-1]["use_cache"] is False


class UnequalLora(torch.nn.Module):
    """Two LoRA blocks of 3 and 14 numbers over a 3-dimensional frozen embedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 3)
        self.emb.weight.requires_grad_(False)
        for name, (a, b) in (("p", ((1, 2), (1, 1))), ("q", ((2, 3), (4, 2)))):
            m = torch.nn.Module()
            m.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(a))})
            m.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(b))})
            setattr(self, name, m)

    def get_input_embeddings(self):
        return self.emb


def test_pfedgate_builds_each_clients_gate_from_its_seed_or_its_state():
    """Blocks in the adapter's order with sizes |A| + |B|; the budget s·(adapter size); the floor
    min(0.1, s); a gate Linear(hidden → blocks) drawn from derive_seed(seed, "pfedgate-init")
    without touching the global RNG, or the gate the client kept."""
    from fedtune.algorithms.options import PFedGateConfig
    from fedtune.algorithms.pfedgate import GATE, Gate, PFedGateLocal
    from fedtune.models.adapters import AdapterSlot

    model = UnequalLora()
    ctx = SimpleNamespace(trainer=SimpleNamespace(model=model, device=torch.device("cpu")),
                          slot=AdapterSlot(model), seed=7, state={})
    before = torch.get_rng_state()
    gated = PFedGateLocal(PFedGateConfig(sparsity=0.25))._gated(ctx)
    assert torch.equal(torch.get_rng_state(), before)
    assert gated.blocks == [("p.lora_A.default", "p.lora_B.default"), ("q.lora_A.default", "q.lora_B.default")]
    assert (gated.sizes, gated.budget, gated.gate.floor) == ([3, 14], 0.25 * 17, 0.1)
    torch.manual_seed(derive_seed(7, "pfedgate-init"))
    drawn = Gate(3, 2, floor=0.1).state_dict()
    for k, v in gated.gate.state_dict().items():
        assert torch.equal(v, drawn[k]), k
    assert PFedGateLocal(PFedGateConfig(sparsity=0.05))._gated(ctx).gate.floor == 0.05
    ctx.state = {GATE + "linear.weight": torch.ones(2, 3), GATE + "linear.bias": torch.tensor([0.5, -0.5])}
    kept = PFedGateLocal(PFedGateConfig())._gated(ctx).gate.state_dict()
    assert kept["linear.weight"].tolist() == [[1.0] * 3] * 2 and kept["linear.bias"].tolist() == [0.5, -0.5]


def test_pfedgate_refuses_an_adapter_without_whole_lora_blocks_in_words():
    from fedtune.algorithms.pfedgate import lora_blocks
    from fedtune.errors import ModelError

    with pytest.raises(ModelError, match=r"^pfedgate gates LoRA modules; the adapter has no lora_A tensors$"):
        lora_blocks(["prefix.embedding", "x.lora_B.default"])
    with pytest.raises(ModelError, match=r"^pfedgate: x\.lora_A\.default has no matching x\.lora_B\.default$"):
        lora_blocks(["x.lora_A.default", "y.lora_B.default"])
    assert lora_blocks(["m.lora_B.w", "m.lora_A.w", "n.lora_A", "n.lora_B"]) == [
        ("m.lora_A.w", "m.lora_B.w"), ("n.lora_A", "n.lora_B")]


def _gate_ctx(model, state, train, sparsity=0.5):
    from fedtune.algorithms.base import PersonalContext
    from fedtune.algorithms.options import PFedGateConfig
    from fedtune.algorithms.pfedgate import PFedGateLocal
    from fedtune.models.adapters import AdapterSlot

    slot = AdapterSlot(model)
    trainer = SimpleNamespace(model=model, device=torch.device("cpu"), pad_id=0,
                              section=SimpleNamespace(batch_size=2))
    ctx = PersonalContext("client_0", 1, 0, slot, trainer, train, state, slot.get())
    return PFedGateLocal(PFedGateConfig(sparsity=sparsity)).personal(ctx)


def test_pfedgate_personal_model_floors_low_scores_and_needs_a_gate_and_data():
    """Scores σ(−x), σ(−2x) at x = 3 are below the floor 0.1: both are 0.1, the tie goes to the
    first block, which alone fits the budget. No gate yet (before the first fit), or no
    training examples: no personal model (the global one stands)."""
    from fedtune.algorithms.pfedgate import GATE
    from fedtune.data.prompts import TokenizedExample

    model = TwoLoraModel((0.8, 0.5), (-0.4, 0.3))
    model.emb.weight.data = torch.tensor([[3.0], [3.0]])
    state = {GATE + "linear.weight": torch.tensor([[-1.0], [-2.0]]), GATE + "linear.bias": torch.zeros(2)}
    train = [TokenizedExample([1, 0], [1, 0])]
    out = _gate_ctx(model, state, train)
    assert out["p.lora_B.default"].item() == pytest.approx(0.1 * 0.5, abs=1e-7)
    assert out["q.lora_B.default"].item() == 0.0
    assert _gate_ctx(model, {}, train) == {}
    assert _gate_ctx(model, state, []) == {}


def test_pfedgate_personal_model_pools_only_the_real_tokens_of_a_padded_batch():
    """Examples [1] and [0, 1] in one batch: [1] is padded, and pools to 3 (not (3 + 1)/2)."""
    from fedtune.algorithms.pfedgate import GATE
    from fedtune.data.prompts import TokenizedExample

    model = TwoLoraModel((0.8, 0.5), (-0.4, 0.3))
    model.emb.weight.data = torch.tensor([[1.0], [3.0]])
    state = {GATE + "linear.weight": torch.tensor([[1.0], [-1.0]]), GATE + "linear.bias": torch.zeros(2)}
    out = _gate_ctx(model, state, [TokenizedExample([1], [1]), TokenizedExample([0, 1], [0, 1])])
    assert out["p.lora_B.default"].item() == pytest.approx(0.5 * (sigmoid(3.0) + sigmoid(2.0)) / 2, abs=1e-6)
    assert out["q.lora_B.default"].item() == 0.0


# -- the personal-state helpers: holdout clients and the top-layer split, word for word -----------

def test_a_holdout_client_refuses_to_train_in_words_and_adapts_with_a_single_step(tmp_path):
    from fedtune.algorithms.base import PersonalContext
    from fedtune.algorithms.personal import HoldoutLocal
    from fedtune.errors import FedtuneError
    from fedtune.models.adapters import AdapterSlot
    from fedtune.train.local import LocalTrainer

    holdout = HoldoutLocal(inner=None, steps=1)
    with pytest.raises(FedtuneError, match=re.escape(
            "client 'client_7' is a holdout client (federation.holdout_clients) and never trains; "
            "the server should not ask it to")):
        holdout.fit(SimpleNamespace(client="client_7"), {})
    model = LogitModel([0.0, 0.0])
    slot = AdapterSlot(model)
    trainer = LocalTrainer(model, recipe("fedavg", 1, lr=0.5, tmp=tmp_path).train, pad_id=0,
                           device=torch.device("cpu"))
    ctx = PersonalContext("client_7", 1, 0, slot, trainer, examples(0, [1, 1]), {}, slot.get())
    assert holdout.personal(ctx)["w"].tolist() == pytest.approx([sgd(0.0, 1.0, 0.5), 0.0], abs=1e-6)
    assert HoldoutLocal(inner=None, steps=0).personal(ctx) == {}


def test_a_top_layer_split_without_layer_numbers_names_two_tensors():
    from fedtune.algorithms.personal import top_layer_names
    from fedtune.errors import ModelError

    with pytest.raises(ModelError, match=re.escape(
            "federation.options.top_layers: no trainable tensor has a layer number in its name (e.g. "
            "['lm_head.weight', 'norm.weight']); name the personal tensors with options.personal")):
        top_layer_names(["lm_head.weight", "norm.weight", "embed.weight"], 1)


def test_a_partial_view_names_at_most_three_missing_tensors_and_fine_tuning_needs_examples():
    from fedtune.algorithms.personal import PartialView, fine_tune
    from fedtune.errors import FedtuneError, ModelError

    adapter = {k: torch.zeros(1) for k in ("e", "d", "c", "b", "a", "p")}
    view = PartialView(SimpleNamespace(get=lambda: dict(adapter)), {"p"})
    with pytest.raises(ModelError, match=re.escape("missing ['a', 'b', 'c'], unexpected []")):
        view.load({"e": torch.zeros(1)})
    with pytest.raises(FedtuneError, match=r"^client 'client_3' has no training examples to fine-tune on$"):
        fine_tune(SimpleNamespace(client="client_3", train=[]), 2, None)
