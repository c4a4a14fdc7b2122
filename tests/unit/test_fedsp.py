"""FedSP: the auxiliary model's shared layers, its distillation and package, the clients'
alternating stages with only prompts sent, the server's prompt tuning between rounds."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_char_tokenizer
from fedtune.algorithms.base import LocalContext
from fedtune.algorithms.fedsp import BODY, FedSPLocal, FedSPParty, FedSPView
from fedtune.algorithms.fedsp_aux import (
    aux_from_package,
    aux_package,
    body,
    build_aux,
    distill_hidden,
)
from fedtune.algorithms.options import FedSPConfig
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.errors import ModelError
from fedtune.models.adapters import AdapterSlot


def _llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(_tok()), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=2, pad_token_id=0)).eval()


def _tok():
    return make_char_tokenizer()


def test_aux_repeats_the_first_block_to_the_full_depth():
    full = _llama(4)
    aux = build_aux(full, shared=1)
    layers = aux.model.layers
    assert len(layers) == 4 and len({id(layer) for layer in layers}) == 4        # own modules ...
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]      # ... own cache slot
    assert all(layers[i].mlp.up_proj.weight is layers[0].mlp.up_proj.weight for i in range(4))
    per_block = sum(p.numel() for p in full.model.layers[0].parameters())
    assert sum(p.numel() for p in aux.parameters()) == sum(p.numel() for p in full.parameters()) - 3 * per_block
    # the full model keeps its own layers
    assert full.model.layers[1].mlp.up_proj.weight is not full.model.layers[0].mlp.up_proj.weight
    two = build_aux(full, shared=2)
    assert two.model.layers[3].self_attn.q_proj.weight is two.model.layers[1].self_attn.q_proj.weight
    assert set(body(two, 2)) == {f"{i}.{n}" for i in range(2) for n, _ in full.model.layers[0].named_parameters()}


def test_distillation_moves_only_the_body_towards_the_full_model():
    full = _llama(4)
    aux = build_aux(full, shared=1)
    embed = aux.model.embed_tokens.weight.detach().clone()
    before = {n: p.detach().clone() for n, p in body(aux, 1).items()}
    grad_flags = [p.requires_grad for p in aux.parameters()]
    g = torch.Generator().manual_seed(0)
    batch = collate([TokenizedExample(input_ids=torch.randint(4, 60, (12,), generator=g).tolist(),
                                      labels=[-100] * 12) for _ in range(4)], 0)

    def batches():
        while True:
            yield batch

    losses = distill_hidden(full, aux, 1, batches(), steps=12, lr=1e-2, device=torch.device("cpu"))
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(aux.model.embed_tokens.weight, embed)
    assert any(not torch.equal(p, before[n]) for n, p in body(aux, 1).items())
    assert [p.requires_grad for p in aux.parameters()] == grad_flags  # as it was
    assert all(p.grad is None for p in aux.parameters())   # no stale gradient for a first client step


class _Block(torch.nn.Module):
    """h·a, plus b where the example holds token 1 (b then has no gradient on other batches)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor([a])), torch.nn.Parameter(torch.tensor([b]))

    def forward(self, h, input_ids):
        return h * self.a + (self.b if bool((input_ids == 1).any()) else 0.0)


class _Toy(torch.nn.Module):
    """One block on a one-dimensional hidden state: the token id as a number."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.layers = torch.nn.ModuleList([_Block(a, b)])

    def forward(self, input_ids, attention_mask, output_hidden_states):
        h = input_ids.float().unsqueeze(-1)
        return SimpleNamespace(hidden_states=(h, self.layers[0](h, input_ids)))


def test_a_parameter_without_a_gradient_in_a_distillation_step_is_not_moved_by_it():
    """AdamW's first step moves each weight with a gradient by lr (sign of −g). b (teacher 1,
    student 0) has a gradient in step 1 (token 1 present: +lr) and none in step 2: it stays at lr,
    where a zeroed (not cleared) gradient would let Adam's momentum move it again."""
    full, aux = _Toy(1.0, 1.0), _Toy(1.0, 0.0)
    ones = torch.ones(1, 2, dtype=torch.long)
    batches = iter([{"input_ids": torch.tensor([[1, 2]]), "attention_mask": ones},
                    {"input_ids": torch.tensor([[2, 3]]), "attention_mask": ones}])
    losses = distill_hidden(full, aux, 1, batches, steps=2, lr=0.1, device=torch.device("cpu"))
    # step 1: teacher (2, 3), student (1, 2): ((t − s)/|t|)² averaged = (1/4 + 1/9)/2
    assert losses[0] == pytest.approx((1 / 4 + 1 / 9) / 2)
    assert aux.layers[0].b.item() == pytest.approx(0.1, abs=1e-6)
    # step 2 from a = 1.1: student (2.2, 3.3), teacher (2, 3): (0.1² + 0.1²)/2
    assert losses[1] == pytest.approx(0.1 ** 2)


def test_the_package_holds_only_the_aux_weights_and_round_trips():
    tok = _tok()
    full = _llama(4)
    aux = build_aux(full, shared=1)
    meta, tensors = aux_package(aux, tok, 1)
    names = {k for k in tensors if k.startswith("model/")}
    assert not any(".layers.1." in n or ".layers.2." in n or ".layers.3." in n for n in names)
    full_layer = full.model.layers[2].mlp.up_proj.weight
    assert not any(t.shape == full_layer.shape and torch.equal(t, full_layer) for t in tensors.values())
    rebuilt, _, shared = aux_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32)
    assert shared == 1 and rebuilt.model.layers[3].mlp.up_proj.weight is rebuilt.model.layers[0].mlp.up_proj.weight
    x = torch.tensor([[5, 9, 12, 7]])
    torch.testing.assert_close(rebuilt(input_ids=x).logits, aux(input_ids=x).logits)
    double, _, _ = aux_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float64)
    assert {p.dtype for p in double.parameters()} == {torch.float64}   # the client's dtype
    torch.testing.assert_close(double(input_ids=x).logits, aux(input_ids=x).logits.double(), atol=1e-5, rtol=1e-5)
    bad = [
        ({**meta, "config": {**meta["config"], "model_type": "evil"}}, tensors, "does not ship"),
        ({**meta, "layers": 3}, tensors, "the server said"),
        (meta, {**tensors, "model/model.layers.1.mlp.up_proj.weight": full_layer.detach()}, "unexpected"),
        (meta, {k: (v[:1] if k.endswith("layers.0.mlp.up_proj.weight") else v) for k, v in tensors.items()},
         "the config says"),
        ({**meta, "shared": 9}, tensors, "bad 'shared'"),
    ]
    for m, t, message in bad:
        with pytest.raises(ModelError, match=message):
            aux_from_package(m, t, device=torch.device("cpu"), dtype=torch.float32)


def _prefixed(model):
    torch.manual_seed(1)
    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                    prefix_projection=True, encoder_hidden_size=8))


class _PlusOne:
    """A trainer whose 'training' adds 1 to every trainable tensor, recording which those were."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def train(self, examples, *, lr, seed, extra_loss=None):
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.calls.append(names)
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        return SimpleNamespace(loss=float(len(self.calls)), steps=1, examples=1, seconds=0.0, dp=None)


def test_clients_alternate_stages_keep_their_body_and_send_only_prompts():
    model = _prefixed(build_aux(_llama(2), shared=1))
    slot = AdapterSlot(model)
    view = FedSPView(1, slot)
    prompt_names = set(slot.params)
    assert any("transform" in n for n in prompt_names)                     # the MLP is in the prompts
    pristine = {n: p.detach().clone() for n, p in body(model, 1).items()}
    global_state = {n: torch.zeros_like(t) for n, t in slot.get().items()}
    view.load(global_state)
    trainer = _PlusOne(model)
    state: dict = {}
    out = FedSPLocal(FedSPConfig()).fit(LocalContext("c", 1, 7, 0.1, slot, trainer, [1], state, {}, {}),
                                        global_state)
    stage_model, stage_prompt = trainer.calls
    assert not set(stage_model) & prompt_names and all(".layers.0." in n for n in stage_model)
    assert set(stage_prompt) == prompt_names
    assert set(out.update) == prompt_names                                 # only prompts travel
    # the prompt stage's figures (the trainer's second call: loss 2), the body stage's loss beside
    assert out.metrics == {"train_loss": 2.0, "steps": 1, "examples_seen": 1, "train_seconds": 0.0,
                           "aux_train_loss": 1.0}
    assert all(torch.equal(v, torch.ones_like(v)) for v in out.update.values())   # the MLP trained too
    assert {k.removeprefix(BODY) for k in state} == set(pristine)
    assert all(torch.equal(state[BODY + n], pristine[n] + 1) for n in pristine)  # its own body, +1
    assert set(slot.params) == {n for n, p in model.named_parameters() if p.requires_grad}
    # another client's turn on the shared model starts from the distilled body, not this one's
    view.load(global_state)
    assert all(torch.equal(p, pristine[n]) for n, p in body(model, 1).items())
    # this client's next round continues its own body: +1 again
    FedSPLocal(FedSPConfig()).fit(LocalContext("c", 2, 7, 0.1, slot, _PlusOne(model), [1], state, {}, {}),
                                  global_state)
    for n in pristine:
        torch.testing.assert_close(state[BODY + n], pristine[n] + 1 + 1, rtol=0, atol=0)


def test_the_server_tunes_the_averaged_prompts_on_the_full_model_between_rounds(tiny_recipe, tiny_model_dir):
    from fedtune.config import load_recipe

    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     federation__algorithm="fedsp",
                                     federation__options={"distill": {"steps": 0}, "server_steps": 1}))
    from transformers import AutoModelForCausalLM

    party = FedSPParty(FedSPConfig(distill={"steps": 0}, server_steps=1), recipe)
    aux = party.server_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _tok(), None)
    server = party.server
    assert aux is server.aux and server.data                                 # the server's own shard
    frozen = {n: p.detach().clone() for n, p in server.full.named_parameters() if not p.requires_grad}
    server.trainer = _PlusOne(server.full)
    averaged = {n: torch.full_like(t, 0.5) for n, t in server.slot.get().items()}
    tuned = party.after_round(1, averaged)
    assert set(tuned) == set(averaged)
    assert all(torch.equal(tuned[n], averaged[n] + 1) for n in averaged)       # 0.5 + one step of +1
    assert all(torch.equal(p, frozen[n]) for n, p in server.full.named_parameters() if not p.requires_grad)
    assert server.trainer.calls == [sorted(averaged)] or set(server.trainer.calls[0]) == set(averaged)


def _fedsp_party(tiny_recipe, tiny_model_dir, **options):
    from transformers import AutoModelForCausalLM

    from fedtune.config import load_recipe

    options = {"distill": {"steps": 2, "batch_size": 2, "examples": 8}, "server_steps": 1,
               "server_examples": 2, **options}
    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     federation__algorithm="fedsp", federation__options=options))
    party = FedSPParty(FedSPConfig(**options), recipe)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return party, party.server_model(full, _tok(), None), recipe


def test_the_owner_ships_the_auxiliary_model_and_reports_it_beside_the_full_one(tiny_recipe, tiny_model_dir,
                                                                               tmp_path):
    from fedtune.algorithms.fedsp import DOWNLOAD
    from fedtune.algorithms.party import GlobalEvaluation

    party, aux, recipe = _fedsp_party(tiny_recipe, tiny_model_dir)
    server = party.server
    assert len(server.distill_losses) == 2 and party.eval_model(None) is server.full
    message = party.downloads()[DOWNLOAD]("client_1")
    assert message.receiver == "client_1" and message.tensors is server.package_tensors
    assert party.client_downloads() == (DOWNLOAD,)
    model, tokenizer, words = party.client_model({DOWNLOAD: message}, recipe)
    assert words == "auxiliary model, 1 shared block(s)"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert all(torch.equal(p, dict(aux.named_parameters())[n]) for n, p in model.named_parameters())
    other = FedSPParty(FedSPConfig(shared_blocks=2), recipe)
    with pytest.raises(ValueError, match="shares 1 blocks, the recipe says 2"):
        other.client_model({DOWNLOAD: message}, recipe)
    # the server's prompt tuning between rounds, then the evaluation of the full model with them
    prompts = {n: torch.zeros_like(t) for n, t in server.slot.get().items()}
    tuned = party.after_round(1, prompts)
    assert len(server.server_losses) == 1 and any(not torch.equal(tuned[n], prompts[n]) for n in prompts)
    loss = server.server_losses[0]   # the training loss of the server's step: a cross-entropy
    assert isinstance(loss, float) and 0 < loss < 20
    written = []
    ev = GlobalEvaluation(state=tuned, tokenized=[], raw=[], generate=False,
                          metrics={"loss": 2.5, "n_examples": 0}, records=[{"a": 1}],
                          write=lambda scope, records: written.append((scope, records)))
    server.evaluator.evaluate = lambda tok, raw, with_generation, predictions: {"loss": 0.75}
    metrics, records = party.evaluate_global(ev)
    assert metrics == {"loss": 0.75, "aux_loss": 2.5} and records == [] and written == [("global_aux", [{"a": 1}])]
    assert all(torch.equal(server.slot.get()[n], tuned[n]) for n in tuned)   # the prompts evaluated
    info = server.info()
    assert info["full_model_bytes"] == sum(p.numel() * 4 for p in server.full.get_base_model().parameters()
                                           if not p.requires_grad)
    assert info["aux_package_bytes"] == sum(t.numel() * t.element_size() for t in server.package_tensors.values())
    assert info["prompt_bytes"] == sum(t.numel() * 4 for t in prompts.values()) > 0
    assert info["shared_blocks"] == 1
    assert info["distill_loss"] == [server.distill_losses[0], server.distill_losses[-1]]
    assert info["server_loss"] == [server.server_losses[0], server.server_losses[0]]
    summary = {**party.summary({"aux_loss": 2.5, "loss": 0.75}), "final": {"n_examples": 5}}
    assert summary["fedsp"]["aux_final"] == {"loss": 2.5}
    assert party.report(summary) == {"labels": {"final": "full model + prompts", "clients": "auxiliary"},
                                     "rows": [{"evaluated_on": "global test", "model": "auxiliary",
                                               "metrics": {"loss": 2.5}, "examples": 5}]}
    assert party.save(tuned, tmp_path / "prompts") is True
    assert (tmp_path / "prompts" / "adapter_config.json").exists()


def test_a_fedsp_party_without_the_server_passes_everything_through(tiny_recipe, tiny_model_dir):
    from fedtune.algorithms.party import GlobalEvaluation
    from fedtune.config import load_recipe

    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     federation__algorithm="fedsp"))
    party = FedSPParty(FedSPConfig(), recipe)
    state = {"p": torch.ones(2)}
    ev = GlobalEvaluation(state=state, tokenized=[], raw=[], generate=False, metrics={"loss": 1.0},
                          records=[{"r": 1}], write=lambda *a: pytest.fail("nothing is written"))
    model = torch.nn.Linear(1, 1)
    assert party.downloads() == {} and party.eval_model(model) is model
    assert party.after_round(1, state) is state and party.evaluate_global(ev) == ({"loss": 1.0}, [{"r": 1}])
    assert party.save(state, None) is False and party.summary({"aux_loss": 1.0}) == {}


def test_without_server_steps_the_averaged_prompts_are_kept(tiny_recipe, tiny_model_dir):
    party, _, _ = _fedsp_party(tiny_recipe, tiny_model_dir, server_steps=0, distill={"steps": 0})
    prompts = {n: torch.full_like(t, 0.5) for n, t in party.server.slot.get().items()}
    assert party.after_round(1, prompts) is prompts
    assert party.server.info()["distill_loss"] is None and party.server.info()["server_loss"] is None


def test_the_auxiliary_model_is_distilled_on_seeded_batches_of_truncated_texts(tiny_recipe, tiny_model_dir,
                                                                              monkeypatch):
    """What distill_hidden is given: batches of `batch_size` seeded synthetic texts cut at
    data.max_length, in a seeded order, the options' steps and rate; and the console's line."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fedtune.algorithms import fedsp
    from fedtune.config import load_recipe
    from fedtune.data.synthetic import pretraining_text
    from fedtune.seeding import derive_seed

    seen = {}

    def fake(full, aux, shared, batches, **kw):
        seen.update(kw, shared=shared, batches=[next(batches) for _ in range(3)])
        return [2.0, 1.5]

    monkeypatch.setattr(fedsp, "distill_hidden", fake)
    options = {"distill": {"steps": 2, "batch_size": 3, "examples": 4, "lr": 5e-4}, "server_steps": 0}
    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     data__max_length=12, federation__algorithm="fedsp",
                                     federation__options=options))
    printed = []
    tok = _tok()
    FedSPParty(FedSPConfig(**options), recipe).server_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok,
        type("Console", (), {"print": lambda self, text: printed.append(text)})())
    assert printed == ["fedsp: distilled the auxiliary model for 2 steps, loss 2.000 → 1.500"]
    assert (seen["shared"], seen["steps"], seen["lr"], seen["device"]) == (1, 2, 5e-4, torch.device("cpu"))
    texts = pretraining_text(4, derive_seed(recipe.seed, "fedsp-distill"))
    examples = [TokenizedExample(x, list(x)) for x in
                (tok(t, truncation=True, max_length=12)["input_ids"] for t in texts)]
    order = np.random.default_rng(derive_seed(recipe.seed, "fedsp-distill-batches")).permutation(4)
    expected = [collate([examples[i] for i in order[s:s + 3]], tok.pad_token_id) for s in (0, 3)]
    for got, want in zip(seen["batches"], expected):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert [b["input_ids"].shape for b in seen["batches"][:2]] == [(3, 12), (1, 12)]


def test_the_servers_shard_is_drawn_with_its_own_seed(tiny_recipe, tiny_model_dir):
    """server_data synthetic: the benchmark's tasks, server_examples per category, drawn with the
    seed derived from (recipe seed, "fedsp-server-data"): not the clients' draw (the recipe seed)."""
    from fedtune.data.prompts import tokenize_examples
    from fedtune.data.synthetic import generate_examples
    from fedtune.seeding import derive_seed

    party, _, recipe = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0}, server_examples=2)
    section = recipe.data.synthetic.model_copy(update={"examples_per_category": 2})

    def ids(seed):
        examples = generate_examples(section, seed)
        tokenized, _ = tokenize_examples(examples, _tok(), template=recipe.data.template,
                                         max_length=recipe.data.max_length, truncation=recipe.data.truncation)
        return [ex.input_ids for ex in tokenized]

    got = [ex.input_ids for ex in party.server.data]
    drawn = generate_examples(section, derive_seed(recipe.seed, "fedsp-server-data"))
    categories = [ex.category for ex in drawn]
    assert len(got) == len(drawn) and all(categories.count(c) == 2 for c in categories)
    assert got == ids(derive_seed(recipe.seed, "fedsp-server-data")) != ids(recipe.seed)


def _refusal(meta, tensors) -> str:
    with pytest.raises(ModelError) as err:
        aux_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32)
    return str(err.value)


def test_each_refusal_of_an_auxiliary_package_says_exactly_what_is_wrong():
    """A client refuses a package it cannot trust with words naming the field, the value (cut
    short) and what was expected."""
    meta, tensors = aux_package(build_aux(_llama(4), shared=1), _tok(), 1)
    config, long = meta["config"], "x" * 60
    assert _refusal({**meta, "format": long}, tensors) == (
        f"fedsp: the auxiliary-model package has format {'x' * 20!r}; this fedtune reads format 1")
    assert _refusal({k: v for k, v in meta.items() if k != "config"}, tensors) == (
        "fedsp: the auxiliary-model package has no model config")
    assert _refusal({**meta, "config": {**config, "model_type": long}}, tensors) == (
        f"fedsp: the auxiliary model is a {'x' * 40!r} model, which this transformers does not ship; "
        "a shipped model never runs remote code")
    inconsistent = {**config, "layer_types": ["bogus"]}
    with pytest.raises(Exception) as cause:   # transformers' own words, cut at 200 characters
        LlamaConfig.from_dict(inconsistent)
    assert len(str(cause.value)) > 200
    assert _refusal({**meta, "config": inconsistent}, tensors) == (
        f"fedsp: the auxiliary model's config is invalid: {str(cause.value)[:200]}")
    assert _refusal({**meta, "config": {**config, "hidden_act": "bogus"}}, tensors) == (
        "offsite-tuning: cannot build the auxiliary model from the server's config: 'bogus'")
    for key, value in [("layers", True), ("layers", 0), ("layers", 10_001), ("layers", "4"), ("shared", 0),
                       ("shared", True), ("shared", 5), ("shared", None)]:
        assert _refusal({**meta, key: value}, tensors) == (
            f"fedsp: the server's auxiliary-model package has a bad '{key}'"), (key, value)
    for layers in (1, 10_000):   # in range, but not the config's 4
        assert _refusal({**meta, "layers": layers, "shared": 1}, tensors) == (
            f"fedsp: the auxiliary model's layers are model.layers (4), the server said model.layers ({layers})")
    assert _refusal({**meta, "prefix": "y" * 60}, tensors) == (
        f"fedsp: the auxiliary model's layers are model.layers (4), the server said {'y' * 40} (4)")
    dropped = sorted(k for k in tensors if k.startswith("model/model.layers.0."))[:4]
    unfit = {**{k: v for k, v in tensors.items() if k not in dropped},
             **{f"model/extra.{i}": torch.zeros(1) for i in range(4)}}
    assert _refusal(meta, unfit) == (
        "fedsp: the auxiliary-model package does not fit its config: missing "
        f"{[k.removeprefix('model/') for k in dropped[:3]]}, unexpected ['extra.0', 'extra.1', 'extra.2']")
    name = "model.layers.0.mlp.up_proj.weight"
    cut = {**tensors, f"model/{name}": tensors[f"model/{name}"][:1]}
    assert _refusal(meta, cut) == f"fedsp: auxiliary tensor {name} is (1, 16), the config says (32, 16)"
    for shared in (0, 5):
        with pytest.raises(ModelError, match=re.escape(
                f"fedsp: shared_blocks={shared} must be between 1 and the model's 4 layers")):
            build_aux(_llama(4), shared=shared)


def test_a_package_sharing_every_block_is_rebuilt_frozen_where_asked_without_remote_code_pointers():
    """shared = layers is allowed (every block its own); the package's `auto_map` (a pointer to
    remote code) is dropped; the model goes to the device and dtype the client asks for, frozen."""
    aux = build_aux(_llama(4), shared=4)
    assert len({id(layer.mlp.up_proj.weight) for layer in aux.model.layers}) == 4
    meta, tensors = aux_package(aux, _tok(), 4)
    meta = {**meta, "config": {**meta["config"], "auto_map": {"AutoModelForCausalLM": "evil--code.Model"}}}
    model, _, shared = aux_from_package(meta, tensors, device=torch.device("meta"), dtype=torch.bfloat16)
    assert shared == 4 and "auto_map" not in model.config.to_dict()
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model, _, _ = aux_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32)
    assert all(torch.equal(p, dict(aux.named_parameters())[n]) for n, p in model.named_parameters())


def test_the_package_is_made_with_every_weight_and_leaves_the_models_flags_as_they_were():
    aux = build_aux(_llama(2), shared=1)
    for p in body(aux, 1).values():
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in aux.named_parameters()}
    assert set(flags.values()) == {True, False}
    meta, tensors = aux_package(aux, _tok(), 1)
    assert {n: p.requires_grad for n, p in aux.named_parameters()} == flags
    assert {k.removeprefix("model/") for k in tensors if k.startswith("model/")} == set(flags)
    assert (meta["format"], meta["prefix"], meta["layers"], meta["shared"]) == (1, "model.layers", 2, 1)


class _Masked(torch.nn.Module):
    """One block (h·a) on a one-dimensional hidden state, the token id where the mask is 1, 0 on
    padding: a model that reads the attention mask it is given."""

    def __init__(self, a: float):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.layers = torch.nn.ModuleList([_Block(a, 0.0)])

    def forward(self, input_ids, attention_mask, output_hidden_states):
        h = (input_ids * attention_mask).float().unsqueeze(-1)
        return SimpleNamespace(hidden_states=(h, self.layers[0](h, input_ids)))


def test_distillation_divides_by_the_teachers_own_scale_even_below_one_and_averages_over_real_tokens():
    """Teacher 0.25·id, student 0.5·id. Step 1 on ids (2, 4, pad): teacher (0.5, 1), student (1, 2),
    each token ((t − s)/|t|)² = 1, the pad left out: loss 1. AdamW's first step moves a by lr
    (0.5 → 0.4). Step 2 on one real token (2, pad): teacher 0.5, student 0.8: (0.3/0.5)² = 0.36."""
    full, aux = _Masked(0.25), _Masked(0.5)
    batches = iter([{"input_ids": torch.tensor([[2, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])},
                    {"input_ids": torch.tensor([[2, 0]]), "attention_mask": torch.tensor([[1, 0]])}])
    losses = distill_hidden(full, aux, 1, batches, steps=2, lr=0.1, device=torch.device("cpu"))
    assert losses == pytest.approx([1.0, 0.36], rel=1e-5)


def test_distillation_loss_of_a_llama_is_the_last_hidden_states_scaled_error_over_real_tokens():
    """The first step's loss recomputed by hand from both models' last hidden states, on a
    right-padded batch: per real token, the mean over the width of ((t − s) / rms(t))²."""
    full = _llama(4)
    aux = build_aux(full, shared=1)
    with torch.no_grad():
        for p in body(aux, 1).values():
            p.mul_(0.5)   # a student that differs from its teacher
    batch = collate([TokenizedExample(input_ids=[5, 9, 12, 7, 30], labels=[-100] * 5),
                     TokenizedExample(input_ids=[8, 3, 40], labels=[-100] * 3)], 0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with torch.no_grad():
        teacher = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[4]
        student = aux(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states[4]
    per_token = []
    for row, length in ((0, 5), (1, 3)):
        for j in range(length):
            t, s = teacher[row, j].tolist(), student[row, j].tolist()
            rms = (sum(x * x for x in t) / 16) ** 0.5
            per_token.append(sum(((x - y) / rms) ** 2 for x, y in zip(t, s)) / 16)
    losses = distill_hidden(full, aux, 1, iter([batch]), steps=1, lr=1e-3, device=torch.device("cpu"))
    assert losses == pytest.approx([sum(per_token) / 8], rel=1e-5)


class _Recorder(_PlusOne):
    """_PlusOne that also records what each call was given."""

    def __init__(self, model):
        super().__init__(model)
        self.given = []

    def train(self, examples, *, lr, seed, extra_loss=None):
        self.given.append((examples, lr, seed))
        return super().train(examples, lr=lr, seed=seed)


def test_a_clients_two_stages_train_on_its_data_at_its_rate_with_their_documented_seeds():
    """Stage "model" with the seed derived from (round seed, "fedsp-model"), stage "prompt" with
    the round seed itself; both on the client's examples at the round's rate."""
    from fedtune.seeding import derive_seed

    model = _prefixed(build_aux(_llama(2), shared=1))
    slot = AdapterSlot(model)
    trainer, data = _Recorder(model), [TokenizedExample(input_ids=[5, 6], labels=[5, 6])]
    global_state = slot.get()
    FedSPLocal(FedSPConfig()).fit(LocalContext("c", 1, 7, 0.25, slot, trainer, data, {}, {}, {}), global_state)
    assert [(examples is data, lr, seed) for examples, lr, seed in trainer.given] == [
        (True, 0.25, derive_seed(7, "fedsp-model")), (True, 0.25, 7)]


def test_the_server_tunes_on_its_shard_at_its_rate_with_the_rounds_seed_and_keeps_the_dtype(
        tiny_recipe, tiny_model_dir):
    """server_lr when given, else train.lr (0.01); the seed derived from (recipe seed,
    "fedsp-server", round); the tuned prompts come back in the averaged prompts' dtype."""
    from fedtune.seeding import derive_seed

    for server_lr, lr in ((None, 0.01), (0.5, 0.5)):
        party, _, recipe = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0}, server_lr=server_lr)
        server = party.server
        server.trainer = _Recorder(server.full)
        averaged = {n: torch.full_like(t, 0.5, dtype=torch.float64) for n, t in server.slot.get().items()}
        tuned = party.after_round(4, averaged)
        [(examples, got_lr, seed)] = server.trainer.given
        assert examples is server.data and got_lr == lr and seed == derive_seed(recipe.seed, "fedsp-server", 4)
        assert all(tuned[n].dtype == torch.float64 and torch.equal(tuned[n], averaged[n] + 1) for n in averaged)


def test_the_server_tunes_server_steps_steps_whatever_the_clients_local_steps(tiny_recipe, tiny_model_dir):
    party, _, recipe = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0}, server_steps=3)
    assert recipe.train.local_steps == 2
    server, results = party.server, []
    train = server.trainer.train
    server.trainer.train = lambda *a, **kw: results.append(train(*a, **kw)) or results[-1]
    party.after_round(1, server.slot.get())
    assert [r.steps for r in results] == [3]


def test_the_servers_shard_from_a_data_file_is_its_first_server_examples_records(tiny_recipe, tiny_model_dir,
                                                                                 tmp_path):
    import json

    from fedtune.data.examples import Example
    from fedtune.data.prompts import tokenize_examples

    rows = [{"instruction": f"say {w}", "output": w} for w in ("one", "two", "three", "four", "five")]
    path = tmp_path / "server.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    party, _, recipe = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0}, server_data=str(path),
                                    server_examples=3)
    expected, _ = tokenize_examples([Example(instruction=r["instruction"], output=r["output"]) for r in rows[:3]],
                                    _tok(), template="compact", max_length=128)
    assert [(ex.input_ids, ex.labels) for ex in party.server.data] == [
        (ex.input_ids, ex.labels) for ex in expected]


def test_a_client_rebuilds_the_download_on_its_own_device_and_dtype_with_a_pad_token(tiny_recipe, tiny_model_dir,
                                                                                  monkeypatch):
    """The download message is the server's package (DOWNLOAD, round 0, from the server); the
    client's model goes to the device and dtype its recipe picks (a device stood in by 'meta'),
    and gets the tokenizer's pad id only when its config has none."""
    from fedtune.algorithms.fedsp import DOWNLOAD
    from fedtune.config import load_recipe
    from fedtune.models import loading
    from fedtune.wire import Message, MessageKind

    party, _, _ = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0})
    message = party.downloads()[DOWNLOAD]("client_2")
    assert (message.kind, message.round, message.sender, message.receiver) == (
        MessageKind.DOWNLOAD, 0, "server", "client_2")
    assert message.meta is party.server.package_meta and message.tensors is party.server.package_tensors
    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     federation__algorithm="fedsp", model__dtype="bfloat16"))
    asked = []
    monkeypatch.setattr(loading, "pick_device", lambda spec: asked.append(spec) or torch.device("meta"))
    model, tokenizer, _ = party.client_model({DOWNLOAD: message}, recipe)
    assert asked == ["auto"] and {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.bfloat16)}
    monkeypatch.undo()
    for pad, expected in ((None, tokenizer.pad_token_id), (7, 7)):
        meta = {**message.meta, "config": {**message.meta["config"], "pad_token_id": pad}}
        other = Message(MessageKind.DOWNLOAD, 0, "server", "client_2", tensors=message.tensors, meta=meta)
        assert party.client_model({DOWNLOAD: other}, recipe)[0].config.pad_token_id == expected


def test_the_full_model_with_the_prompts_is_evaluated_on_the_global_test_with_its_answers(tiny_recipe,
                                                                                        tiny_model_dir):
    """The server's evaluator: the loss is the full model's mean loss per response token with the
    prompts loaded; with generation, one record per example whose prompt is the recipe's
    ("compact") template filled in; the auxiliary model's figures beside as aux_*."""
    from fedtune.algorithms.party import GlobalEvaluation
    from fedtune.data.examples import Example
    from fedtune.data.prompts import tokenize_examples

    party, _, _ = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0})
    server = party.server
    raw = [Example(instruction="add 2 and 3", output="5")]
    tokenized, _ = tokenize_examples(raw, _tok(), template="compact", max_length=128)
    prompts = {n: torch.full_like(t, 0.1) for n, t in server.slot.get().items()}
    written = []
    ev = GlobalEvaluation(state=prompts, tokenized=tokenized, raw=raw, generate=True,
                          metrics={"loss": 2.5, "n_examples": 1}, records=[{"aux": 1}],
                          write=lambda scope, records: written.append(scope))
    metrics, records = party.evaluate_global(ev)
    server.slot.set(prompts)
    ids, labels = tokenized[0].input_ids, tokenized[0].labels
    with torch.no_grad():
        logits = server.full(input_ids=torch.tensor([ids])).logits[0]
    pairs = [(logits[i], labels[i + 1]) for i in range(len(ids) - 1) if labels[i + 1] != -100]
    loss = sum(-torch.log_softmax(row, -1)[y].item() for row, y in pairs) / len(pairs)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5) and metrics["n_examples"] == 1
    assert metrics["aux_loss"] == 2.5 and "aux_n_examples" not in metrics and written == ["global_aux"]
    assert [r["prompt"] for r in records] == ["### Instruction:\nadd 2 and 3\n### Response:\n"]
    assert records[0]["reference"] == "5" and metrics["n_generated"] == 1


def test_the_full_models_prompts_are_first_drawn_with_their_documented_seed(tiny_recipe, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from fedtune.models.adapters import attach_adapter
    from fedtune.seeding import derive_seed

    party, _, recipe = _fedsp_party(tiny_recipe, tiny_model_dir, distill={"steps": 0})
    got = party.server.slot.get()
    torch.manual_seed(derive_seed(recipe.seed, "fedsp-full-prompts"))
    expected = AdapterSlot(attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), recipe.adapter)).get()
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in got)


def test_the_distillation_texts_are_tokenized_and_those_of_one_token_or_none_left_out(tiny_recipe, tiny_model_dir,
                                                                                   monkeypatch):
    from transformers import AutoModelForCausalLM

    from fedtune.algorithms import fedsp, offsite_server
    from fedtune.config import load_recipe

    seen = []
    monkeypatch.setattr(offsite_server, "distill_texts", lambda *a: ["", "a", "bc", "def"])
    monkeypatch.setattr(fedsp, "distill_hidden", lambda full, aux, shared, batches, **kw: seen.append(next(batches))
                        or [1.0])
    options = {"distill": {"steps": 1, "batch_size": 4}, "server_steps": 0}
    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     federation__algorithm="fedsp", federation__options=options))
    tok = _tok()
    FedSPParty(FedSPConfig(**options), recipe).server_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                           tok, None)
    [batch] = seen
    rows = sorted("".join(tok.convert_ids_to_tokens([i for i in row if i != tok.pad_token_id]))
                  for row in batch["input_ids"].tolist())
    assert rows == ["bc", "def"] and torch.equal(batch["labels"][batch["attention_mask"] == 1],
                                                 batch["input_ids"][batch["attention_mask"] == 1])


def test_the_owner_hands_over_a_frozen_auxiliary_model_and_keeps_its_full_model_frozen(tiny_recipe, tiny_model_dir):
    """Only the prompts attached later train: the auxiliary model comes back with no trainable
    weight (its body is made trainable by a client's stage only), the full model's base too."""
    party, aux, _ = _fedsp_party(tiny_recipe, tiny_model_dir)
    assert not any(p.requires_grad for p in aux.parameters())
    assert not any(p.requires_grad for p in party.server.full.get_base_model().parameters())


def test_the_servers_shard_follows_the_recipes_truncation_rule(tiny_recipe, tiny_model_dir, tmp_path):
    """data.truncation = drop: a record longer than data.max_length (48 tokens) is left out of the
    server's shard, as it is of the clients' (the default rule would cut its prompt instead)."""
    import json

    from transformers import AutoModelForCausalLM

    from fedtune.config import load_recipe

    rows = [{"instruction": "say one", "output": "one"}, {"instruction": "x" * 80, "output": "two"}]
    path = tmp_path / "server.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"distill": {"steps": 0}, "server_steps": 1, "server_data": str(path)}
    recipe = load_recipe(tiny_recipe(adapter={"method": "prefix_tuning", "options": {"num_virtual_tokens": 3}},
                                     data__truncation="drop", data__max_length=48, federation__algorithm="fedsp",
                                     federation__options=options))
    party = FedSPParty(FedSPConfig(**options), recipe)
    party.server_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _tok(), None)
    from fedtune.data.examples import Example
    from fedtune.data.prompts import tokenize_examples

    [short], _ = tokenize_examples([Example(instruction="say one", output="one")], _tok(), template="compact",
                                   max_length=48)
    assert [(ex.input_ids, ex.labels) for ex in party.server.data] == [(short.input_ids, short.labels)]


def test_a_package_whose_model_cannot_be_allocated_is_refused_in_words():
    """A config whose shapes all check out but whose weights no client could hold (a vocabulary
    of 2⁴⁰ tokens, some 70 TB; the package's tensors are expanded views, no memory): the skeleton
    on the meta device builds, the real model does not, and the client says so."""
    meta, tensors = aux_package(build_aux(_llama(2), shared=1), _tok(), 1)
    vocab = 2 ** 40
    huge = {**meta, "config": {**meta["config"], "vocab_size": vocab}}
    wide = {k: (v[:1].expand(vocab, v.shape[1]) if k in ("model/model.embed_tokens.weight", "model/lm_head.weight")
                else v) for k, v in tensors.items()}
    with pytest.raises(ModelError, match=re.escape(
            "offsite-tuning: cannot build the auxiliary model from the server's config: ")):
        aux_from_package(huge, wide, device=torch.device("cpu"), dtype=torch.float32)


def test_a_models_persistent_buffers_travel_in_the_package_and_are_checked():
    """Apertus keeps its activation's β and ε as persistent buffers (not parameters), one per layer
    even where the layers share their weights: each travels, is checked by name and is loaded."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    tok = _tok()
    config = CONFIG_MAPPING["apertus"](vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                       pad_token_id=0)
    torch.manual_seed(0)
    aux = build_aux(AutoModelForCausalLM.from_config(config).eval(), shared=1)
    with torch.no_grad():
        for name, buffer in aux.named_buffers():
            if name.endswith("act_fn.beta"):
                buffer.fill_(0.25)
    meta, tensors = aux_package(aux, tok, 1)
    betas = [f"model.layers.{i}.mlp.act_fn.beta" for i in range(3)]
    assert all(f"model/{n}" in tensors for n in betas)
    model, _, _ = aux_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32)
    assert [dict(model.named_buffers())[n].item() for n in betas] == [0.25, 0.25, 0.25]
    x = torch.tensor([[5, 9, 12]])
    torch.testing.assert_close(model(input_ids=x).logits, aux(input_ids=x).logits)
    without = {k: v for k, v in tensors.items() if k != f"model/{betas[2]}"}
    assert _refusal(meta, without) == (f"fedsp: the auxiliary-model package does not fit its config: missing "
                                       f"{[betas[2]]}, unexpected []")


def test_the_owners_info_gives_the_first_and_last_distillation_and_server_losses(tiny_recipe, tiny_model_dir,
                                                                               monkeypatch):
    from fedtune.algorithms import fedsp

    monkeypatch.setattr(fedsp, "distill_hidden", lambda *a, **kw: [3.0, 2.0, 1.5])
    party, _, _ = _fedsp_party(tiny_recipe, tiny_model_dir)
    server = party.server
    server.trainer = _PlusOne(server.full)   # its losses: 1, 2, 3 (its call count)
    for round_ in (1, 2, 3):
        party.after_round(round_, server.slot.get())
    info = server.info()
    assert info["distill_loss"] == [3.0, 1.5] and info["server_loss"] == [1.0, 3.0]


class _Embedded(_Masked):
    """_Masked with a weight outside the body (an 'embedding' scale) in front of its block."""

    def __init__(self, a: float):
        super().__init__(a)
        self.embed = torch.nn.Parameter(torch.tensor([1.0]))

    def forward(self, input_ids, attention_mask, output_hidden_states):
        h = (input_ids * attention_mask).float().unsqueeze(-1) * self.embed
        return SimpleNamespace(hidden_states=(h, self.layers[0](h, input_ids)))


def test_distillation_trains_only_the_body_and_leaves_no_gradient_anywhere():
    """A weight outside the body gets no gradient (it is frozen while distilling) and the body's
    gradients are cleared, not zeroed: no stale gradient for a client's first step."""
    full, aux = _Embedded(0.25), _Embedded(0.5)
    batch = {"input_ids": torch.tensor([[2, 4, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert distill_hidden(full, aux, 1, iter([batch]), steps=1, lr=0.1, device=torch.device("cpu")) == [1.0]
    assert [p.grad for p in aux.parameters()] == [None, None, None]
    assert aux.embed.item() == 1.0 and all(p.requires_grad for p in aux.parameters())
