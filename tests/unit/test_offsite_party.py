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
