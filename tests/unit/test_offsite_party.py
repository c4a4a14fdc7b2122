"""Offsite-tuning's party without a whole run: the owner builds and distils the emulator, a client
rebuilds it from the package it downloads, the distilled core is kept with the run and reused on
resume, and the summary and closing table report the emulator beside the plugged-in full model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import make_char_tokenizer
from fedtune.algorithms.offsite import DOWNLOAD, OffsiteParty
from fedtune.algorithms.offsite_emulator import kept_layers
from fedtune.algorithms.offsite_server import CORE_FILE, distill_texts
from fedtune.algorithms.options import OffsiteConfig
from fedtune.algorithms.party import GlobalEvaluation
from fedtune.config import load_recipe
from fedtune.data.synthetic import pretraining_text
from fedtune.errors import RunDirError

STEPS = 2


def _party(tiny_recipe, four_layer_dir, steps=STEPS):
    options = {"adapter_bottom": 1, "adapter_top": 1, "drop_ratio": 0.5,
               "distill": {"steps": steps, "batch_size": 2, "examples": 8}}
    recipe = load_recipe(tiny_recipe(model={"name": four_layer_dir}, adapter={"method": "full"},
                                     federation__algorithm="offsite", federation__options=options))
    party = OffsiteParty(OffsiteConfig(**options), recipe)
    full = AutoModelForCausalLM.from_pretrained(four_layer_dir)
    emulator_model = party.server_model(full, make_char_tokenizer(), None)
    return party, full, emulator_model, recipe


def test_the_owner_builds_a_distilled_emulator_and_a_client_rebuilds_it(tiny_recipe, four_layer_dir):
    party, full, model, recipe = _party(tiny_recipe, four_layer_dir)
    server = party.server
    assert model is server.emulator.model and party.eval_model(None) is full
    assert server.emulator.kept == kept_layers(4, 1, 1, 0.5) == [0, 1, 3]
    assert len(server.distill_losses) == STEPS
    info = server.info()
    assert info["full_model_layers"] == 4 and info["emulator_layers"] == [0, 1, 3]
    assert info["adapter_layers"] == {"0": 0, "2": 3}
    assert info["full_model_bytes"] == sum(p.numel() * 4 for p in full.parameters())
    assert info["distill_loss"] == [server.distill_losses[0], server.distill_losses[-1]]
    # what a client downloads, and the emulator it rebuilds: the owner's frozen layers, bit for bit
    assert list(party.downloads()) == [DOWNLOAD] and party.client_downloads() == (DOWNLOAD,)
    message = party.downloads()[DOWNLOAD]("client_2")
    assert message.receiver == "client_2" and message.tensors is server.package_tensors
    assert server.package_bytes("client_2") == info["emulator_bytes"] > 0
    client_model, tokenizer, words = OffsiteParty(party.options, recipe).client_model({DOWNLOAD: message}, recipe)
    assert words == "3 layers" and client_model.config.pad_token_id == tokenizer.pad_token_id
    owner = dict(model.named_parameters())
    frozen = [n for n, p in owner.items() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(client_model.named_parameters())[n], owner[n]) for n in frozen)


def test_the_distilled_core_is_kept_and_reused_on_resume(tiny_recipe, four_layer_dir, tmp_path):
    party, _, model, _ = _party(tiny_recipe, four_layer_dir)
    party.keep(tmp_path, resume=False)
    saved = Path(tmp_path) / CORE_FILE
    assert saved.exists()
    core = {n: p.detach().clone() for n, p in party.server._core().items()}
    assert core and all(".1." in n for n in core)        # the one core layer kept (full layer 1)
    with torch.no_grad():
        for p in party.server._core().values():
            p.add_(1.0)
    party.keep(tmp_path, resume=True)                      # back to the saved values, in place
    assert all(torch.equal(p, core[n]) for n, p in party.server._core().items())
    # the package's tensors share the core's parameters, so clients get the restored values
    tensors = party.server.package_tensors
    shared = [n for n in tensors if n.startswith("model/") and ".1." in n]
    assert shared and all(torch.equal(tensors[n], core[n.removeprefix("model/")]) for n in shared)
    other, _, _, _ = _party(tiny_recipe, four_layer_dir)
    other.keep(tmp_path / "nothing-kept", resume=True)    # missing: a warning, the new core stays
    bad = {k: v[:1] for k, v in load_file(str(saved)).items()}
    save_file(bad, str(saved))
    with pytest.raises(RunDirError, match="does not fit this recipe's emulator core"):
        party.keep(tmp_path, resume=True)


def test_without_distillation_nothing_is_kept(tiny_recipe, four_layer_dir, tmp_path):
    party, _, _, _ = _party(tiny_recipe, four_layer_dir, steps=0)
    assert party.server.distill_losses == [] and party.server.info()["distill_loss"] is None
    party.keep(tmp_path, resume=False)
    assert not (Path(tmp_path) / CORE_FILE).exists()


def test_the_owner_evaluates_and_saves_the_plugged_in_full_model(tiny_recipe, four_layer_dir, tmp_path):
    party, full, model, _ = _party(tiny_recipe, four_layer_dir, steps=0)
    adapter = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters() if p.requires_grad}
    written = []
    ev = GlobalEvaluation(state=adapter, tokenized=[], raw=[], generate=False,
                          metrics={"loss": 3.5, "n_examples": 0}, records=[{"a": 1}],
                          write=lambda scope, records: written.append((scope, records)))
    seen = {}

    def evaluate(tok, raw, with_generation, predictions):   # as the evaluator: answers appended
        seen.update(layer=full.model.layers[3].mlp.up_proj.weight.detach().clone())
        if predictions is not None:
            predictions.append({"answer": "full"})
        return {"loss": 1.25}

    party.server.full_evaluator.evaluate = evaluate
    metrics, records = party.evaluate_global(ev)
    assert metrics == {"loss": 1.25, "emulator_loss": 3.5}
    assert records == [{"answer": "full"}]   # the full model's answers: the global predictions
    assert written == [("global_emulator", [{"a": 1}])]
    assert torch.equal(seen["layer"], torch.full_like(seen["layer"], 0.25))   # layer 3 plugged in
    assert party.save(adapter, tmp_path / "model") is True
    assert (tmp_path / "model" / "config.json").exists()
    summary = {**party.summary({"emulator_loss": 3.5, "loss": 1.25}), "final": {"n_examples": 7}}
    assert summary["offsite"]["emulator_final"] == {"loss": 3.5}
    assert party.report(summary)["rows"] == [{"evaluated_on": "global test", "model": "emulator",
                                              "metrics": {"loss": 3.5}, "examples": 7}]
    assert party.report(summary)["labels"] == {"final": "plugged-in", "clients": "emulator"}


def test_a_client_side_party_has_no_server_work(tiny_recipe, four_layer_dir):
    recipe = load_recipe(tiny_recipe(model={"name": four_layer_dir}, adapter={"method": "full"},
                                     federation__algorithm="offsite"))
    party = OffsiteParty(OffsiteConfig(), recipe)
    model = torch.nn.Linear(1, 1)
    ev = GlobalEvaluation(state={}, tokenized=[], raw=[], generate=False, metrics={"loss": 1.0},
                          records=[{"r": 1}], write=lambda *a: pytest.fail("nothing is written"))
    assert party.downloads() == {} and party.eval_model(model) is model
    assert party.evaluate_global(ev) == ({"loss": 1.0}, [{"r": 1}])
    assert party.save({}, Path("unused")) is False and party.summary({"loss": 1.0}) == {}
    party.keep(Path("unused"), resume=True)


def test_the_distillation_texts_are_the_synthetic_statements(tiny_recipe, four_layer_dir):
    recipe = load_recipe(tiny_recipe())
    assert distill_texts("synthetic", 5, 11, recipe) == pretraining_text(5, 11)


def test_the_owner_distils_on_seeded_batches_of_truncated_synthetic_texts(tiny_recipe, four_layer_dir,
                                                                         monkeypatch):
    """What `distill` is given: batches of `batch_size` texts of the seeded synthetic corpus, cut at
    data.max_length, in a seeded order; the options' rates and weights; and the console's line."""
    import numpy as np

    from fedtune.algorithms import offsite_server
    from fedtune.data.prompts import TokenizedExample, collate
    from fedtune.seeding import derive_seed

    seen = {}

    def fake_distill(full, emulator, batches, **kw):
        seen.update(kw, batches=[next(batches) for _ in range(5)])
        return [1.0, 0.5]

    monkeypatch.setattr(offsite_server, "distill", fake_distill)
    options = {"distill": {"steps": 2, "batch_size": 3, "examples": 4, "lr": 3e-4, "lm_weight": 0.5,
                           "kd_weight": 2.0}}
    recipe = load_recipe(tiny_recipe(model={"name": four_layer_dir}, adapter={"method": "full"},
                                     data__max_length=12, federation__algorithm="offsite",
                                     federation__options=options))
    printed = []
    party = OffsiteParty(OffsiteConfig(**options), recipe)
    tokenizer = make_char_tokenizer()
    party.server_model(AutoModelForCausalLM.from_pretrained(four_layer_dir), tokenizer,
                       type("Console", (), {"print": lambda self, text: printed.append(text)})())
    assert printed == ["offsite-tuning: distilled the emulator for 2 steps, loss 1.000 → 0.500"]
    assert party.server.distill_losses == [1.0, 0.5]
    assert {k: seen[k] for k in ("steps", "lr", "lm_weight", "kd_weight")} == {
        "steps": 2, "lr": 3e-4, "lm_weight": 0.5, "kd_weight": 2.0}
    assert seen["device"] == torch.device("cpu")
    texts = pretraining_text(4, derive_seed(recipe.seed, "offsite-distill"))
    assert all(len(tokenizer(t)["input_ids"]) > 12 for t in texts)     # the cut matters
    ids = [tokenizer(t, truncation=True, max_length=12)["input_ids"] for t in texts]
    examples = [TokenizedExample(x, list(x)) for x in ids]
    rng = np.random.default_rng(derive_seed(recipe.seed, "offsite-distill-batches"))
    expected = []
    while len(expected) < 5:   # 4 examples in batches of 3: a full and a short batch per epoch
        order = rng.permutation(4)
        expected += [collate([examples[i] for i in order[s:s + 3]], tokenizer.pad_token_id) for s in (0, 3)]
    for got, want in zip(seen["batches"], expected):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [b["input_ids"].shape for b in seen["batches"]] == [(3, 12), (1, 12)] * 2 + [(3, 12)]


# -- what the owner hands on, exactly -----------------------------------------------------------


def test_the_owner_evaluates_with_the_recipe_settings_and_passes_every_input_through(tiny_recipe, four_layer_dir):
    from fedtune.wire import MessageKind

    party, full, model, recipe = _party(tiny_recipe, four_layer_dir, steps=0)
    server = party.server
    evaluator = server.full_evaluator
    assert evaluator.model is full and evaluator.section is recipe.eval and evaluator.device == torch.device("cpu")
    assert (evaluator.template, evaluator.max_length) == ("compact", 128)
    assert evaluator.tokenizer("ab")["input_ids"] == make_char_tokenizer()("ab")["input_ids"]
    message = server.package_message("client_1")
    assert (message.kind, message.round, message.sender, message.receiver) == (MessageKind.DOWNLOAD, 0, "server", "client_1")
    assert message.meta is server.package_meta and message.tensors is server.package_tensors
    seen = []

    def evaluate(tokenized, raw, with_generation, predictions):
        seen.append((tokenized, raw, with_generation, predictions))
        predictions.append({"answer": "full"})
        return {"exact_match": 0.5}

    evaluator.evaluate = evaluate
    tokenized, raw = ["tokenized"], ["raw"]
    adapter = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    ev = GlobalEvaluation(state=adapter, tokenized=tokenized, raw=raw, generate=True,
                          metrics={"loss": 2.0, "n_examples": 3}, records=[], write=lambda *a: None)
    metrics, records = party.evaluate_global(ev)
    assert len(seen) == 1 and seen[0][0] is tokenized and seen[0][1] is raw and seen[0][2] is True
    assert seen[0][3] is records and records == [{"answer": "full"}]
    assert metrics == {"exact_match": 0.5, "emulator_loss": 2.0}
    server.distill_losses = [3.0, 2.0, 1.0]                 # the first and the last, not the second
    assert server.info()["distill_loss"] == [3.0, 1.0]


def test_the_owner_keeps_the_core_in_a_new_run_folder_and_saves_it_again(tiny_recipe, four_layer_dir, tmp_path):
    party, _, _, _ = _party(tiny_recipe, four_layer_dir)
    run_dir = tmp_path / "not" / "made" / "yet"
    party.keep(run_dir, resume=False)
    party.keep(run_dir, resume=False)                  # a second save over the first is fine
    saved = load_file(str(run_dir / CORE_FILE))
    core = party.server._core()
    assert saved.keys() == core.keys() and all(torch.equal(saved[n], p) for n, p in core.items())


def test_the_owner_drops_texts_under_two_tokens_and_seeds_the_distillation(tiny_recipe, four_layer_dir,
                                                                           monkeypatch):
    """Texts of 0 or 1 token cannot train a next-token loss and are dropped, one of 2 is kept; the
    distillation runs under the seed derived from the recipe's as "offsite-distill-init"; the
    console line gives the first and the last loss."""
    from fedtune.algorithms import offsite_server
    from fedtune.seeding import derive_seed

    seen = {}

    def fake_texts(source, n, seed, recipe):
        seen.update(texts=(source, n, seed, recipe))
        return ["ab", "c", "", "defg"]

    def fake_distill(full, emulator, batches, **kw):
        seen.update(seed=torch.initial_seed(), batches=[next(batches) for _ in range(2)])
        return [1.0, 0.75, 0.5]

    monkeypatch.setattr(offsite_server, "distill_texts", fake_texts)
    monkeypatch.setattr(offsite_server, "distill", fake_distill)
    options = {"distill": {"steps": 3, "batch_size": 4, "examples": 4}}
    recipe = load_recipe(tiny_recipe(model={"name": four_layer_dir}, adapter={"method": "full"},
                                     federation__algorithm="offsite", federation__options=options))
    printed = []
    party = OffsiteParty(OffsiteConfig(**options), recipe)
    party.server_model(AutoModelForCausalLM.from_pretrained(four_layer_dir), make_char_tokenizer(),
                       type("Console", (), {"print": lambda self, text: printed.append(text)})())
    assert seen["texts"] == ("synthetic", 4, derive_seed(recipe.seed, "offsite-distill"), recipe)
    assert seen["seed"] == derive_seed(recipe.seed, "offsite-distill-init")
    ab, defg = make_char_tokenizer()("ab")["input_ids"], make_char_tokenizer()("defg")["input_ids"]
    assert len(ab) == 2 and len(make_char_tokenizer()("c")["input_ids"]) == 1
    for batch in seen["batches"]:     # both kept texts in every batch (4 a batch), right-padded with 0
        rows = sorted(tuple(r) for r in batch["input_ids"].tolist())
        assert rows == sorted([tuple(ab) + (0, 0), tuple(defg)])
    assert printed == ["offsite-tuning: distilled the emulator for 3 steps, loss 1.000 → 0.500"]


def test_the_distillation_texts_of_a_data_file_join_instruction_input_and_output(tiny_recipe, tmp_path):
    import json

    path = tmp_path / "server.jsonl"
    rows = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
            {"instruction": "Say", "input": "hi", "output": "hi there"},
            {"instruction": "Third", "input": "", "output": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(tiny_recipe())
    assert distill_texts(str(path), 2, 0, recipe) == ["Add 1 and 2. 3", "Say hi hi there"]


def test_a_client_rebuilds_the_emulator_in_the_recipe_dtype_within_the_message_limit(tiny_recipe, four_layer_dir,
                                                                                 caplog):
    import logging

    from fedtune.errors import ModelError

    party, _, _, recipe = _party(tiny_recipe, four_layer_dir, steps=0)
    message = party.downloads()[DOWNLOAD]("client_0")
    as_bf16 = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "bfloat16"})})
    with caplog.at_level(logging.WARNING, logger="fedtune.offsite"):
        model, _, _ = OffsiteParty(party.options, as_bf16).client_model({DOWNLOAD: message}, as_bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not caplog.records                        # nothing to say without quantization
    quantized = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "4bit"})})
    with caplog.at_level(logging.WARNING, logger="fedtune.offsite"):
        OffsiteParty(party.options, quantized).client_model({DOWNLOAD: message}, quantized)
    assert [r.getMessage() for r in caplog.records] == [
        "model.quantization=4bit is not applied to the shipped emulator; it runs in torch.float32"]
    # the adapter layers (layers 0 and 3 of the tiny Llama: 2 × 2,592 float32 parameters) must fit a FIT
    small = recipe.model_copy(update={"transport": recipe.transport.model_copy(update={"max_message_bytes": 20735})})
    with pytest.raises(ModelError, match=r"would take 20736 bytes, over transport.max_message_bytes \(20735\)"):
        OffsiteParty(party.options, small).client_model({DOWNLOAD: message}, small)


def test_the_registered_party_of_offsite_holds_its_options_and_recipe(tiny_recipe, four_layer_dir):
    from fedtune.algorithms import build_party

    options = {"adapter_bottom": 2, "adapter_top": 1, "drop_ratio": 0.25}
    recipe = load_recipe(tiny_recipe(model={"name": four_layer_dir}, adapter={"method": "full"},
                                     federation__algorithm="offsite", federation__options=options))
    party = build_party("offsite", options, recipe)
    assert isinstance(party, OffsiteParty) and party.recipe is recipe and party.server is None
    assert (party.options.adapter_bottom, party.options.adapter_top, party.options.drop_ratio) == (2, 1, 0.25)


def test_a_client_gives_an_emulator_without_a_pad_token_the_tokenizers_and_keeps_one_it_has(tiny_recipe,
                                                                                             four_layer_dir):
    from fedtune.wire import Message

    party, _, _, recipe = _party(tiny_recipe, four_layer_dir, steps=0)
    message = party.downloads()[DOWNLOAD]("client_0")
    pad = make_char_tokenizer().pad_token_id
    for said, expected in ((None, pad), (pad + 5, pad + 5)):
        meta = {**message.meta, "config": {**message.meta["config"], "pad_token_id": said}}
        sent = Message(message.kind, 0, "server", "client_0", tensors=message.tensors, meta=meta)
        model, _, _ = OffsiteParty(party.options, recipe).client_model({DOWNLOAD: sent}, recipe)
        assert model.config.pad_token_id == expected
