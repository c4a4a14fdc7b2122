"""Offsite-tuning: layer dropping, which layers train, plug-in by depth, distillation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.algorithms.offsite_emulator import (
    build_emulator,
    distill,
    kept_layers,
    plug_in,
    plug_in_names,
)
from fedtune.data.prompts import collate
from fedtune.errors import ModelError


def _llama(layers: int = 8) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=2)).eval()


def test_kept_layers_by_hand():
    assert kept_layers(8, 1, 1, 0.5) == [0, 1, 3, 5, 7]           # core 1..6, 3 kept, stride 2
    assert kept_layers(32, 2, 2, 0.2) == [0, 1] + [2 + (i * 28) // 22 for i in range(22)] + [30, 31]
    assert kept_layers(4, 1, 1, 0.0) == [0, 1, 2, 3]
    assert kept_layers(4, 1, 1, 0.9) == [0, 1, 3]                   # at least one core layer
    with pytest.raises(ModelError, match="too few"):
        kept_layers(2, 1, 1, 0.5)
    with pytest.raises(ModelError, match="at least 1"):
        kept_layers(8, 0, 0, 0.5)
    for bottom, top in ((-1, 2), (2, -1)):   # a negative count is refused even when the sum is >= 1
        with pytest.raises(ModelError, match="adapter_bottom \\+ adapter_top must be at least 1"):
            kept_layers(8, bottom, top, 0.5)


def test_emulator_drops_layers_and_trains_only_the_adapter_layers():
    full = _llama(8)
    emu = build_emulator(full, 2, 1, 0.5)
    assert emu.kept == [0, 1, 2, 4, 7] and emu.model.config.num_hidden_layers == 5
    assert full.config.num_hidden_layers == 8 and len(full.model.layers) == 8
    assert emu.adapter_layers == {0: 0, 1: 1, 4: 7}
    trainable = {n.split(".")[2] for n, p in emu.model.named_parameters() if p.requires_grad}
    assert trainable == {"0", "1", "4"}
    assert not any(p.requires_grad for p in full.parameters())
    # kept core layers are copies of the full model's, caches indexed by the new positions
    assert torch.equal(emu.model.model.layers[3].mlp.up_proj.weight, full.model.layers[4].mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in emu.model.model.layers] == [0, 1, 2, 3, 4]
    ids = torch.randint(4, 40, (2, 6))
    out = emu.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)


def test_plug_in_puts_the_adapter_layers_back_at_their_depths():
    full = _llama(8)
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    emu = build_emulator(full, 1, 2, 0.5)          # kept [0, 1, 3, 6, 7]; adapter 0→0, 3→6, 4→7
    assert emu.kept == [0, 1, 3, 6, 7]
    adapter = {n: torch.full_like(p, float(i + 1))
               for i, (n, p) in enumerate((n, p) for n, p in emu.model.named_parameters() if p.requires_grad)}
    names = plug_in_names(emu, sorted(adapter))
    assert names["model.layers.3.mlp.down_proj.weight"] == "model.layers.6.mlp.down_proj.weight"
    assert names["model.layers.4.self_attn.q_proj.weight"] == "model.layers.7.self_attn.q_proj.weight"
    assert names["model.layers.0.input_layernorm.weight"] == "model.layers.0.input_layernorm.weight"
    plug_in(full, emu, adapter)
    after = dict(full.named_parameters())
    for src, dst in names.items():
        assert torch.equal(after[dst], adapter[src]), (src, dst)
    untouched = [n for n in before if n not in set(names.values())]
    assert any(".layers.3." in n for n in untouched) and any(".layers.1." in n for n in untouched)
    assert all(torch.equal(after[n], before[n]) for n in untouched)
    with pytest.raises(ModelError, match="not a parameter of an adapter layer"):
        plug_in_names(emu, ["model.layers.1.mlp.up_proj.weight"])


def test_distillation_moves_only_the_core_towards_the_full_model():
    full = _llama(6)
    emu = build_emulator(full, 1, 1, 0.5)
    adapter_before = {n: p.detach().clone() for n, p in emu.model.named_parameters() if p.requires_grad}
    core_before = emu.model.model.layers[1].mlp.up_proj.weight.detach().clone()
    gen = torch.Generator().manual_seed(2)

    def batches():
        from fedtune.data.prompts import TokenizedExample

        while True:
            rows = [torch.randint(4, 40, (12,), generator=gen).tolist() for _ in range(8)]
            yield collate([TokenizedExample(r, list(r)) for r in rows], 0)

    losses = distill(full, emu, batches(), steps=60, lr=3e-3, lm_weight=0.0, kd_weight=1.0,
                     device=torch.device("cpu"))
    assert len(losses) == 60 and sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert not torch.equal(emu.model.model.layers[1].mlp.up_proj.weight, core_before)
    for n, p in emu.model.named_parameters():   # adapter layers untouched, flags restored
        if n in adapter_before:
            assert p.requires_grad and torch.equal(p, adapter_before[n])
        else:
            assert not p.requires_grad


def test_one_distillation_step_moves_the_core_by_the_learning_rate():
    """AdamW's first step (no weight decay) is lr·g/(|g| + eps): each core weight with a gradient
    moves by lr, up to eps; the adapter layers stay as they were, frozen flags restored."""
    full = _llama(4)
    emu = build_emulator(full, 1, 1, 0.5)                 # kept [0, 1, 3]: layer 1 is the core
    before = {n: p.detach().clone() for n, p in emu.model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    from fedtune.data.prompts import TokenizedExample

    rows = [torch.randint(4, 40, (8,), generator=gen).tolist() for _ in range(4)]
    batch = collate([TokenizedExample(r, list(r)) for r in rows], 0)
    losses = distill(full, emu, iter([batch]), steps=1, lr=1e-2, lm_weight=1.0, kd_weight=1.0,
                     device=torch.device("cpu"))
    assert len(losses) == 1 and losses[0] > 0
    moved = emu.model.model.layers[1].mlp.up_proj.weight - before["model.layers.1.mlp.up_proj.weight"]
    assert moved.abs().max().item() == pytest.approx(1e-2, rel=1e-3)
    for n, p in emu.model.named_parameters():
        if ".layers.1." not in n:
            assert torch.equal(p, before[n]), n
    assert [n for n, p in emu.model.named_parameters() if p.requires_grad] == [
        n for n in before if n.startswith(("model.layers.0.", "model.layers.2."))]


# -- the emulator package a deployed client downloads ---------------------------------------------


def _package(char_tokenizer):
    from fedtune.algorithms.offsite_package import emulator_package

    emulator = build_emulator(_llama(6), 1, 1, 0.5)
    meta, tensors = emulator_package(emulator, char_tokenizer)
    return emulator, meta, tensors


def _rebuild(meta, tensors):
    from fedtune.algorithms.offsite_package import emulator_from_package

    return emulator_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32)


def test_the_tokenizer_files_a_client_writes_are_removed_at_exit(char_tokenizer, monkeypatch):
    import atexit
    from pathlib import Path

    from fedtune.algorithms import offsite_package

    at_exit = []
    monkeypatch.setattr(offsite_package, "_KEEP", [])
    monkeypatch.setattr(atexit, "register", at_exit.append)
    _, _, tensors = _package(char_tokenizer)
    tokenizer = offsite_package._tokenizer(tensors)
    offsite_package._tokenizer(tensors)
    folders = [Path(d) for d in offsite_package._KEEP]
    assert len(folders) == 2 and all(d.is_dir() for d in folders) and len(at_exit) == 1   # one hook
    assert tokenizer("ab")["input_ids"] == char_tokenizer("ab")["input_ids"]
    at_exit[0]()
    assert not any(d.exists() for d in folders)


def test_the_package_holds_the_frozen_emulator_and_the_tokenizer_but_no_adapter_layer(char_tokenizer):
    from fedtune.transport.codec import decode, encode
    from fedtune.wire import Message, MessageKind

    emulator, meta, tensors = _package(char_tokenizer)
    trainable = {n for n, p in emulator.model.named_parameters() if p.requires_grad}
    assert set(meta["trainable"]) == trainable and meta["kept"] == emulator.kept == [0, 1, 3, 5]
    weights = {k.removeprefix("model/") for k in tensors if k.startswith("model/")}
    assert not weights & trainable and "model.layers.1.mlp.up_proj.weight" in weights
    assert not any(k.startswith("model/model.layers.4.") for k in tensors)  # 4 layers in the emulator
    assert {k for k in tensors if k.startswith("tokenizer/")} >= {"tokenizer/tokenizer.json"}
    # It is plain data for the codec, and survives the wire bit for bit.
    wire = decode(encode(Message(MessageKind.DOWNLOAD, 0, "server", "client_0", tensors=tensors, meta=meta)))
    rebuilt, tokenizer = _rebuild(wire.meta, wire.tensors)
    original = emulator.model.state_dict()
    for name, tensor in rebuilt.model.state_dict().items():
        if name in trainable:
            assert not tensor.any()  # zero until the first FIT brings the global adapter
        else:
            assert torch.equal(tensor, original[name]), name
    assert {n for n, p in rebuilt.model.named_parameters() if p.requires_grad} == trainable
    assert rebuilt.kept == emulator.kept and rebuilt.adapter_layers == emulator.adapter_layers
    assert tokenizer("a b!").input_ids == char_tokenizer("a b!").input_ids
    with torch.no_grad():  # with the adapter layers in place it is the same model
        params = dict(rebuilt.model.named_parameters())
        for name, p in emulator.model.named_parameters():
            if p.requires_grad:
                params[name].copy_(p)
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        assert torch.equal(rebuilt.model(ids).logits, emulator.model(ids).logits)


def test_a_hostile_or_broken_package_is_refused(char_tokenizer):
    _, meta, tensors = _package(char_tokenizer)
    cases = [
        ({**meta, "format": 2}, tensors, "has format '2'; this fedtune reads format 1"),
        (meta, {k: v for k, v in tensors.items() if not k.startswith("tokenizer/")}, "has 0 tokenizer files"),
        ({**meta, "config": {**meta["config"], "model_type": "evil_remote"}}, tensors, "remote code"),
        (meta, {k: v for k, v in tensors.items() if k != "model/model.norm.weight"}, "missing"),
        (meta, {**tensors, "model/model.extra": torch.zeros(2)}, "unexpected"),
        (meta, {**tensors, "model/model.norm.weight": torch.zeros(3)}, "model.norm.weight"),
        (meta, {**tensors, "tokenizer/../../etc/x": torch.zeros(2, dtype=torch.uint8)}, "refusing"),
        (meta, {**tensors, "tokenizer/.bashrc": torch.zeros(2, dtype=torch.uint8)}, "refusing"),
        ({**meta, "trainable": ["model.layers.9.nope"]}, tensors, "not in the emulator"),
        ({**meta, "kept": "all"}, tensors, "'kept'"),
    ]
    for bad_meta, bad_tensors, match in cases:
        with pytest.raises(ModelError, match=match):
            _rebuild(bad_meta, bad_tensors)
    # A peer's pointer to remote code in the config is dropped, never followed.
    config = {**meta["config"], "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    rebuilt, _ = _rebuild({**meta, "config": config}, tensors)
    assert type(rebuilt.model).__name__ == "LlamaForCausalLM"


def test_adapter_layers_larger_than_a_fit_message_are_refused_before_allocation(char_tokenizer):
    from fedtune.algorithms.offsite_package import emulator_from_package

    _, meta, tensors = _package(char_tokenizer)
    with pytest.raises(ModelError, match="max_message_bytes"):
        emulator_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32,
                              max_adapter_bytes=1000)


def test_a_gpt2_emulator_round_trips_through_its_package(char_tokenizer):
    """Another layout (transformer.h, Conv1D, tied head, non-persistent buffers)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedtune.algorithms.offsite_package import emulator_package

    torch.manual_seed(0)
    full = GPT2LMHeadModel(GPT2Config(vocab_size=len(char_tokenizer), n_embd=16, n_layer=5, n_head=2,
                                      n_positions=64, bos_token_id=2, eos_token_id=3)).eval()
    emulator = build_emulator(full, 1, 1, 0.5)
    rebuilt, _ = _rebuild(*emulator_package(emulator, char_tokenizer))
    assert rebuilt.prefix == "transformer.h" and rebuilt.kept == [0, 1, 2, 4]
    with torch.no_grad():
        params = dict(rebuilt.model.named_parameters())
        for name, p in emulator.model.named_parameters():
            if p.requires_grad:
                params[name].copy_(p)
        ids = torch.tensor([[5, 6, 7, 8]])
        assert torch.equal(rebuilt.model(ids).logits, emulator.model(ids).logits)
    # the head is tied to the embeddings: a package may send both, if they are equal
    meta, tensors = emulator_package(emulator, char_tokenizer)
    assert "model/lm_head.weight" not in tensors
    wte = tensors["model/transformer.wte.weight"]
    _rebuild(meta, {**tensors, "model/lm_head.weight": wte.clone()})
    with pytest.raises(ModelError, match=r"ties \['transformer.wte.weight', 'lm_head.weight'\], but"):
        _rebuild(meta, {**tensors, "model/lm_head.weight": wte + 1})


def test_distillation_reads_the_attention_mask_of_a_left_padded_batch():
    """Nothing dropped (drop_ratio 0): the emulator is the full model, so on the real tokens its
    hidden states equal the teacher's and the first loss is 0, padding on either side."""
    full = _llama(4)
    emu = build_emulator(full, 1, 1, 0.0)
    assert emu.kept == [0, 1, 2, 3]
    ids = torch.tensor([[0, 0, 7, 9, 11], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    losses = distill(full, emu, iter([batch]), steps=1, lr=1e-2, lm_weight=0.0, kd_weight=1.0,
                     device=torch.device("cpu"))
    assert losses == [pytest.approx(0.0, abs=1e-10)]


# -- the package, field by field (the exact texts: a client reading the error must learn what is wrong)


def _refused(meta, tensors, message, **kw):
    import re

    from fedtune.algorithms.offsite_package import emulator_from_package

    with pytest.raises(ModelError, match="^" + re.escape(message) + "$"):
        emulator_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32, **kw)


class _TokenizerFiles:
    """Stands in for a tokenizer: writes an empty file, a small one and a folder; notes where."""

    def __init__(self):
        self.folders = []

    def save_pretrained(self, directory):
        from pathlib import Path

        self.folders.append(Path(directory))
        (Path(directory) / "empty.txt").write_bytes(b"")
        (Path(directory) / "vocab.json").write_bytes(b'{"a": 0}')
        (Path(directory) / "sub").mkdir()
        (Path(directory) / "sub" / "inner.txt").write_bytes(b"x")


def test_the_package_meta_and_tokenizer_files_by_hand():
    from fedtune.algorithms.offsite_package import emulator_package

    emulator = build_emulator(_llama(6), 1, 1, 0.5)       # kept [0, 1, 3, 5]; adapter layers 0 and 3
    files = _TokenizerFiles()
    meta, tensors = emulator_package(emulator, files)
    parts = ["input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
             "self_attn.q_proj.weight", "self_attn.v_proj.weight"]
    trainable = [f"model.layers.{i}.{p}" for i in (0, 3) for p in parts]
    assert {k: v for k, v in meta.items() if k != "config"} == {
        "format": 1, "prefix": "model.layers", "kept": [0, 1, 3, 5], "bottom": 1, "top": 1,
        "trainable": trainable}
    config = meta["config"]   # the whole config, defaults included (use_diff=False)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 4 and config["hidden_size"] == 16
    assert config["return_dict"] is True and config["output_hidden_states"] is False
    frozen = {f"model/model.layers.{i}.{p}" for i in (1, 2) for p in parts} | {
        "model/model.embed_tokens.weight", "model/model.norm.weight", "model/lm_head.weight"}
    assert {k for k in tensors if k.startswith("model/")} == frozen
    assert torch.equal(tensors["model/model.layers.2.mlp.up_proj.weight"], emulator.model.model.layers[2].mlp.up_proj.weight)
    # the tokenizer's files as bytes, an empty one as an empty tensor; folders are not files
    assert {k for k in tensors if k.startswith("tokenizer/")} == {"tokenizer/empty.txt", "tokenizer/vocab.json"}
    empty, vocab = tensors["tokenizer/empty.txt"], tensors["tokenizer/vocab.json"]
    assert empty.dtype == vocab.dtype == torch.uint8 and empty.shape == (0,)
    assert bytes(vocab.tolist()) == b'{"a": 0}'
    # written in a named temporary folder, removed afterwards
    assert len(files.folders) == 1 and files.folders[0].name.startswith("fedtune-tokenizer-")
    assert not files.folders[0].exists()


def test_each_bad_field_of_a_package_is_refused_by_name(char_tokenizer):
    _, meta, tensors = _package(char_tokenizer)
    bad = "offsite-tuning: the server's emulator package has a bad "
    cases = [
        ("kept", "all", "'kept' (str, expected list)"),
        ("kept", None, "'kept' (NoneType, expected list)"),
        ("kept", [0, 1, "3", 5], "'kept' (list, expected list)"),
        ("kept", [0, True, 3, 5], "'kept' (list, expected list)"),
        ("bottom", True, "'bottom' (bool, expected int)"),
        ("bottom", -1, "'bottom' (int, expected int)"),
        ("top", 1_000_000, "'top' (int, expected int)"),
        ("top", 1.0, "'top' (float, expected int)"),
        ("prefix", 3, "'prefix' (int, expected str)"),
        ("trainable", [1], "'trainable' (list, expected list)"),
        ("trainable", "model.layers.0.mlp.up_proj.weight", "'trainable' (str, expected list)"),
        ("config", [], "'config' (list, expected dict)"),
    ]
    for key, value, said in cases:
        _refused({**meta, key: value}, tensors, bad + said)
    for key in ("config", "kept", "bottom", "top", "prefix", "trainable"):   # each one is required
        _refused({k: v for k, v in meta.items() if k != key}, tensors, f"{bad}'{key}' (NoneType, expected "
                 + {"config": "dict", "kept": "list", "prefix": "str", "trainable": "list"}.get(key, "int") + ")")
    fmt = "offsite-tuning: the server's emulator package has format "
    _refused({**meta, "format": "x" * 30}, tensors, fmt + "'" + "x" * 20 + "'; this fedtune reads format 1")
    _refused({k: v for k, v in meta.items() if k != "format"}, tensors, fmt + "'None'; this fedtune reads format 1")


def test_the_package_edges_a_valid_emulator_may_take(char_tokenizer):
    """No bottom adapter layer, and adapter layers taking every emulator layer, are valid layouts."""
    _, meta, tensors = _package(char_tokenizer)
    from fedtune.algorithms.offsite_package import emulator_from_package

    def rebuild(**changes):
        return emulator_from_package({**meta, **changes}, tensors, device=torch.device("cpu"),
                                     dtype=torch.float32)[0]

    rebuilt = rebuild(bottom=0)
    assert (rebuilt.bottom, rebuilt.top, rebuilt.adapter_layers) == (0, 1, {3: 5})
    rebuilt = rebuild(bottom=2, top=2)
    assert (rebuilt.bottom, rebuilt.top, rebuilt.core_layers()) == (2, 2, [])


def test_a_package_whose_model_cannot_be_built_is_refused_with_the_reason(char_tokenizer, monkeypatch):
    _, meta, tensors = _package(char_tokenizer)
    config = meta["config"]
    said = "offsite-tuning: the server's emulator is a "
    tail = " model, which this transformers does not ship; a shipped emulator never runs remote code"
    _refused({**meta, "config": {**config, "model_type": "evil_" * 10}}, tensors, said + repr(("evil_" * 10)[:40]) + tail)
    _refused({**meta, "config": {**config, "model_type": 7}}, tensors, said + "'7'" + tail)
    _refused({**meta, "config": {**config, "num_attention_heads": 0}}, tensors,
             "offsite-tuning: the server's emulator config is invalid: integer modulo by zero")
    _refused({**meta, "config": {**config, "hidden_act": "nope"}}, tensors,
             "offsite-tuning: cannot build the emulator from the server's config: 'nope'")
    # the layout checked on a weightless copy succeeds, the real one finds no memory: said so
    from transformers import AutoModelForCausalLM

    build = AutoModelForCausalLM.from_config

    def no_memory(cfg, **kw):
        if torch.get_default_device().type != "meta":
            raise MemoryError("cannot allocate 12 bytes\nmore detail")
        return build(cfg, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", no_memory)
    _refused(meta, tensors, "offsite-tuning: cannot build the emulator from the server's config: "
                            "cannot allocate 12 bytes")


def test_a_package_that_does_not_fit_its_config_is_refused_with_the_names(char_tokenizer):
    _, meta, tensors = _package(char_tokenizer)
    layers = "offsite-tuning: the emulator's layers are model.layers (4), the server said "
    _refused({**meta, "kept": [0, 1, 3]}, tensors, layers + "model.layers (3, 1 + 1 adapter layers)")
    _refused({**meta, "prefix": "p" * 50}, tensors, layers + "p" * 40 + " (4, 1 + 1 adapter layers)")
    _refused({**meta, "bottom": 3, "top": 2}, tensors, layers + "model.layers (4, 3 + 2 adapter layers)")
    _refused({**meta, "trainable": ["d", "model.layers.9.nope", "a", "c", "b"]}, tensors,
             "offsite-tuning: adapter tensors ['a', 'b', 'c'] are not in the emulator")
    frozen = sorted(k for k in tensors if k.startswith("model/"))
    fit = "offsite-tuning: the emulator package does not fit its config: "
    missing = {k: v for k, v in tensors.items() if k not in frozen[:4]}
    names = [k.removeprefix("model/") for k in frozen[:3]]
    _refused(meta, missing, f"{fit}missing {names}, unexpected []")
    extra = {**tensors, **{f"model/x{i}": torch.zeros(1) for i in range(4)}}
    _refused(meta, extra, f"{fit}missing [], unexpected ['x0', 'x1', 'x2']")
    _refused(meta, {**tensors, "model/model.norm.weight": torch.zeros(3)},
             "offsite-tuning: emulator tensor model.norm.weight is (3,), the config says (16,)")
    # the adapter layers (2 Llama layers of 2,592 parameters, float32) against a FIT's limit
    _refused(meta, tensors, "offsite-tuning: the emulator's adapter layers would take 20736 bytes, over "
                            "transport.max_message_bytes (20735)", max_adapter_bytes=20735)
    from fedtune.algorithms.offsite_package import emulator_from_package

    emulator_from_package(meta, tensors, device=torch.device("cpu"), dtype=torch.float32, max_adapter_bytes=20736)


def test_a_gpt2_package_with_a_different_tied_head_is_refused_with_the_names(char_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedtune.algorithms.offsite_package import emulator_package

    torch.manual_seed(0)
    full = GPT2LMHeadModel(GPT2Config(vocab_size=len(char_tokenizer), n_embd=16, n_layer=5, n_head=2,
                                      n_positions=64, bos_token_id=2, eos_token_id=3)).eval()
    meta, tensors = emulator_package(build_emulator(full, 1, 1, 0.5), char_tokenizer)
    wte = tensors["model/transformer.wte.weight"]
    _refused(meta, {**tensors, "model/lm_head.weight": wte + 1},
             "offsite-tuning: the emulator config ties ['transformer.wte.weight', 'lm_head.weight'], but "
             "the package's tensors for them differ")


def test_the_rebuilt_emulator_takes_the_dtype_asked_for_and_no_code_reference(char_tokenizer):
    from fedtune.algorithms.offsite_package import emulator_from_package

    emulator, meta, tensors = _package(char_tokenizer)
    config = {**meta["config"], "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    rebuilt, _ = emulator_from_package({**meta, "config": config}, tensors, device=torch.device("cpu"),
                                       dtype=torch.float64)
    assert {p.dtype for p in rebuilt.model.parameters()} == {torch.float64}
    assert torch.equal(rebuilt.model.model.layers[1].mlp.up_proj.weight,
                       emulator.model.model.layers[1].mlp.up_proj.weight.double())
    assert "auto_map" not in rebuilt.model.config.to_dict()


def _tokenizer_tensors(tokenizer, **more: bytes):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    files.update(more)
    return {"tokenizer/" + k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in files.items()}


def test_the_tokenizer_files_of_a_package_are_checked_one_by_one(char_tokenizer):
    import re

    from fedtune.algorithms.offsite_package import _tokenizer

    def refused(tensors, message):
        with pytest.raises(ModelError, match="^" + re.escape(message) + "$"):
            _tokenizer(tensors)

    sent = _tokenizer_tensors(char_tokenizer)
    refused({}, "offsite-tuning: the emulator package has 0 tokenizer files")
    extra = {f"tokenizer/extra{i}.txt": torch.tensor([65], dtype=torch.uint8) for i in range(32)}
    refused({**sent, **extra}, f"offsite-tuning: the emulator package has {len(sent) + 32} tokenizer files")
    at_most = dict(list(extra.items())[:32 - len(sent)])
    assert _tokenizer({**sent, **at_most})("ab")["input_ids"] == char_tokenizer("ab")["input_ids"]
    long_name = "." + "x" * 60
    refused({**sent, "tokenizer/" + long_name: torch.zeros(1, dtype=torch.uint8)},
            f"offsite-tuning: refusing tokenizer file {long_name[:40]!r} from the server")
    refused({**sent, "tokenizer/a.txt": torch.zeros(2)}, "offsite-tuning: refusing tokenizer file 'a.txt' from the server")
    refused({**sent, "tokenizer/b.txt": torch.zeros(2, 2, dtype=torch.uint8)},
            "offsite-tuning: refusing tokenizer file 'b.txt' from the server")


def test_a_tokenizer_without_eos_or_with_code_from_the_server_is_not_taken_as_is(char_tokenizer):
    import json
    import re
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from fedtune.algorithms.offsite_package import _tokenizer

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>"] + sorted(set(string.printable)))}
    no_eos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                                     pad_token="<pad>", unk_token="<unk>")
    with pytest.raises(ModelError, match="^" + re.escape("the server's emulator: the tokenizer has no EOS token; set one") + "$"):
        _tokenizer(_tokenizer_tensors(no_eos))
    # a tokenizer config naming code of the server's is read with the shipped class; the code never runs
    sent = _tokenizer_tensors(char_tokenizer)
    config = json.loads(bytes(sent["tokenizer/tokenizer_config.json"].tolist()))
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    sent = {**sent, **_tokenizer_tensors(type("T", (), {"save_pretrained": lambda self, d: None})(),
                                          **{"tokenizer_config.json": json.dumps(config).encode(),
                                             "evil.py": b"raise RuntimeError('the server code ran')\n"})}
    assert _tokenizer(sent)("ab")["input_ids"] == char_tokenizer("ab")["input_ids"]


def test_the_tokenizer_folders_are_named_and_removed_at_exit_even_if_one_is_gone(char_tokenizer, monkeypatch):
    import atexit
    import shutil
    from pathlib import Path

    from fedtune.algorithms import offsite_package

    at_exit = []
    monkeypatch.setattr(offsite_package, "_KEEP", [])
    monkeypatch.setattr(atexit, "register", at_exit.append)
    sent = _tokenizer_tensors(char_tokenizer)
    offsite_package._tokenizer(sent)
    offsite_package._tokenizer(sent)
    folders = [Path(d) for d in offsite_package._KEEP]
    assert len(folders) == 2 and all(d.name.startswith("fedtune-emulator-tokenizer-") for d in folders)
    shutil.rmtree(folders[0])          # removed by someone else already: not an error at exit
    at_exit[0]()
    assert not folders[1].exists()


# -- the emulator: layouts, edges and the distillation loss by hand -------------------------------


def test_kept_layers_at_the_edges_and_the_exact_refusals():
    import re

    assert kept_layers(3, 1, 1, 0.5) == [0, 1, 2]                 # a core of one layer is enough
    assert kept_layers(5, 0, 1, 0.5) == [0, 2, 4]                 # no bottom adapter: core 0..3, 2 kept
    assert kept_layers(5, 2, 0, 0.5) == [0, 1, 2, 3]              # no top adapter: core 2..4, 2 kept
    assert kept_layers(9, 1, 1, 0.25) == [0, 1, 2, 3, 5, 6, 8]   # core 1..7, round(5.25) = 5 kept
    at_least = "^" + re.escape("offsite-tuning: adapter_bottom + adapter_top must be at least 1") + "$"
    for bottom, top in ((0, 0), (-1, 2), (2, -1)):
        with pytest.raises(ModelError, match=at_least):
            kept_layers(8, bottom, top, 0.5)
    with pytest.raises(ModelError, match="^" + re.escape(
            "offsite-tuning: the model has 3 layers, too few for 2 bottom + 1 top adapter layers and a core") + "$"):
        kept_layers(3, 2, 1, 0.5)


class _Block(torch.nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.layer_idx = i


class _Stack(torch.nn.Module):
    """A model whose layer list sits at `path` (no dot, or two), counted by `num_layers` only."""

    def __init__(self, n: int, path: str):
        from types import SimpleNamespace

        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(num_layers=n, layer_types=[f"t{i}" for i in range(n)])
        self.head = torch.nn.Linear(2, 2)
        owner = self
        for part in path.split(".")[:-1]:
            owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.add_module(path.split(".")[-1], torch.nn.ModuleList(_Block(i) for i in range(n)))


@pytest.mark.parametrize("path", ["blocks", "body.inner.blocks"])
def test_the_emulator_of_a_layer_list_at_any_depth(path):
    full = _Stack(6, path)
    emu = build_emulator(full, 1, 2, 0.5)            # core 1..3, round(1.5) = 2 kept: 1, 2
    assert emu.kept == [0, 1, 2, 4, 5] and emu.prefix == path
    layers = full.get_submodule(path)
    kept = emu.model.get_submodule(path)
    assert len(layers) == 6 and len(kept) == 5
    assert [b.layer_idx for b in kept] == [0, 1, 2, 3, 4] and [b.layer_idx for b in layers] == list(range(6))
    for block, i in zip(kept, emu.kept):              # copies of the full model's layers, not shared
        assert torch.equal(block.proj.weight, layers[i].proj.weight)
        assert block.proj.weight.data_ptr() != layers[i].proj.weight.data_ptr()
    assert emu.model.config.num_layers == 5 and emu.model.config.layer_types == ["t0", "t1", "t2", "t4", "t5"]
    assert full.config.num_layers == 6 and full.config.layer_types == [f"t{i}" for i in range(6)]
    trainable = {n for n, p in emu.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.{i}.proj.{w}" for i in (0, 3, 4) for w in ("weight", "bias")}
    assert emu.adapter_layers == {0: 0, 3: 4, 4: 5}
    assert not any(p.requires_grad for p in full.parameters())
    names = plug_in_names(emu, [f"{path}.3.proj.weight", f"{path}.0.proj.bias"])
    assert names == {f"{path}.3.proj.weight": f"{path}.4.proj.weight", f"{path}.0.proj.bias": f"{path}.0.proj.bias"}


def test_a_model_without_one_layer_list_or_a_layer_count_is_refused_by_name():
    import re
    from types import SimpleNamespace

    twins = _Stack(3, "blocks")
    twins.other = torch.nn.ModuleList(_Block(i) for i in range(3))
    with pytest.raises(ModelError, match="^" + re.escape(
            "offsite-tuning: cannot find the one list of 3 transformer layers in _Stack "
            "(candidates: ['blocks', 'other'])") + "$"):
        build_emulator(twins, 1, 1, 0.5)
    uncounted = _Stack(3, "blocks")
    uncounted.config = SimpleNamespace(layers=3)
    with pytest.raises(ModelError, match="^" + re.escape(
            "offsite-tuning: the model config has none of ('num_hidden_layers', 'n_layer', 'num_layers')") + "$"):
        build_emulator(uncounted, 1, 1, 0.5)
    emu = build_emulator(_Stack(4, "blocks"), 1, 1, 0.5)
    for name in ("head.weight", "other.blocks.0.proj.weight", "blocks.1.proj.weight"):
        with pytest.raises(ModelError, match="^" + re.escape(
                f"offsite-tuning: {name} is not a parameter of an adapter layer") + "$"):
            plug_in_names(emu, [name])


def _distill_by_hand(full, emu, batch, lm_weight, kd_weight):
    """The documented loss: lm·LM(emulator) + kd·masked mean over tokens of mean_j ((t − s) / rms(t))²,
    t and s the hidden states entering the first top adapter layer (full layer n − top, emulator m − top)."""
    with torch.no_grad():
        t = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=True).hidden_states[4 - 1]
        out = emu.model(**batch, output_hidden_states=True)
        s = out.hidden_states[3 - 1]
        total, tokens = 0.0, 0
        for b, row in enumerate(batch["attention_mask"].tolist()):
            for j, real in enumerate(row):
                if real:
                    rms = t[b, j].pow(2).mean().sqrt()
                    total += ((t[b, j] - s[b, j]) / rms).pow(2).mean().item()
                    tokens += 1
        return lm_weight * out.loss.item() + kd_weight * total / tokens


def test_the_first_distillation_loss_by_hand_on_left_padded_batches():
    full = _llama(4)
    ids = torch.tensor([[0, 0, 7, 9, 11], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    one = {"input_ids": torch.tensor([[0, 0, 9, 12]]), "attention_mask": torch.tensor([[0, 0, 1, 1]])}
    for batch in ({"input_ids": ids, "attention_mask": mask},
                  {**one, "attention_mask": torch.tensor([[0, 0, 0, 1]])}):   # one real token
        batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
        if batch["attention_mask"].sum() == 1:
            batch["labels"] = torch.tensor([[-100, -100, 9, 12]])   # the LM loss needs a target
        emu = build_emulator(full, 1, 1, 0.5)                      # kept [0, 1, 3]
        want = _distill_by_hand(full, emu, batch, 0.5, 2.0)
        losses = distill(full, emu, iter([batch]), steps=1, lr=1e-2, lm_weight=0.5, kd_weight=2.0,
                         device=torch.device("cpu"))
        assert losses == [pytest.approx(want, rel=1e-5)]
        assert want > 0.1


def test_a_distillation_step_is_adamw_without_weight_decay():
    """AdamW's first step without weight decay moves each core weight by lr·g/(|g| + eps): by lr for
    the norm weights (1.0, where a decay of 0.01 would add lr·0.01 = 1e-4)."""
    full = _llama(4)
    emu = build_emulator(full, 1, 1, 0.5)
    before = emu.model.model.layers[1].input_layernorm.weight.detach().clone()
    gen = torch.Generator().manual_seed(4)
    from fedtune.data.prompts import TokenizedExample

    rows = [torch.randint(4, 40, (8,), generator=gen).tolist() for _ in range(4)]
    distill(full, emu, iter([collate([TokenizedExample(r, list(r)) for r in rows], 0)]), steps=1, lr=1e-2,
            lm_weight=1.0, kd_weight=1.0, device=torch.device("cpu"))
    moved = (emu.model.model.layers[1].input_layernorm.weight - before).abs()
    assert torch.allclose(moved, torch.full_like(moved, 1e-2), rtol=0, atol=2e-5)   # eps: up to 5e-6


def test_a_client_is_never_asked_whether_to_run_the_servers_tokenizer_code(char_tokenizer, monkeypatch):
    """A tokenizer config naming only code of the server's (no shipped class) is refused outright:
    transformers would otherwise ask at the terminal, and a "y" there would run the server's code."""
    import builtins
    import json

    from fedtune.algorithms.offsite_package import _tokenizer

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    sent = _tokenizer_tensors(char_tokenizer)
    config = json.loads(bytes(sent["tokenizer/tokenizer_config.json"].tolist()))
    config.pop("tokenizer_class", None)
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    evil = b"raise RuntimeError('the server code ran')\n"
    sent = {**sent, **_tokenizer_tensors(type("T", (), {"save_pretrained": lambda self, d: None})(),
                                          **{"tokenizer_config.json": json.dumps(config).encode(), "evil.py": evil})}
    with pytest.raises(ModelError, match="^offsite-tuning: cannot load the tokenizer the server sent: ") as error:
        _tokenizer(sent)
    assert "contains custom code" in str(error.value)            # transformers' reason, first line
    assert "code ran" not in str(error.value) and asked == []


def test_a_three_way_tie_is_checked_on_every_tensor_and_named_by_its_first_two():
    """Some configs tie three tensors (ProphetNet's causal LM: head, encoder and decoder embeddings)."""
    import re

    from fedtune.algorithms.offsite_package import _check_layout

    class Tied3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(2, 2, bias=False) for _ in range(3))
            self.b.weight = self.c.weight = self.a.weight

    w = torch.ones(2, 2)
    _check_layout(Tied3(), {"a.weight": w, "b.weight": w.clone(), "c.weight": w.clone()}, [], None)
    message = "^" + re.escape("offsite-tuning: the emulator config ties ['a.weight', 'b.weight'], but the "
                              "package's tensors for them differ") + "$"
    for b, c in ((w, w + 1), (w + 1, w)):
        with pytest.raises(ModelError, match=message):
            _check_layout(Tied3(), {"a.weight": w, "b.weight": b, "c.weight": c}, [], None)
