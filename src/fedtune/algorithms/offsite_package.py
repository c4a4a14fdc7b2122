"""The offsite-tuning emulator as a download: everything a deployed client needs from the model owner.

The package is plain data for the message codec (no pickle, no code): `meta` holds the emulator's
model config as JSON, its layer layout and the names of the trainable adapter tensors; `tensors`
holds the frozen weights (`model/<name>`) and the tokenizer's files as bytes (`tokenizer/<file>`).
The adapter layers do not travel here: they arrive with the first FIT like any global adapter.

The client rebuilds the emulator from the config with a model class transformers ships (a shipped
emulator never runs remote code), loads the frozen weights, and checks that every parameter is
either in the package or an adapter tensor. It never sees the full model.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.offsite_emulator import Emulator, layer_list
from fedtune.errors import ModelError

FORMAT = 1
MODEL = "model/"
TOKENIZER = "tokenizer/"
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_TOKENIZER_FILES = 32


def emulator_package(emulator: Emulator, tokenizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) describing `emulator` without its trainable layers, and its tokenizer."""
    model = emulator.model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    every_param = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors: dict[str, torch.Tensor] = {
        MODEL + n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    for name, buf in model.state_dict().items():  # persistent buffers (parameters are above)
        if name not in every_param:
            tensors[MODEL + name] = buf.detach()
    with tempfile.TemporaryDirectory(prefix="fedtune-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                data = path.read_bytes()
                tensors[TOKENIZER + path.name] = (torch.frombuffer(bytearray(data), dtype=torch.uint8)
                                                  if data else torch.zeros(0, dtype=torch.uint8))
    meta = {
        "format": FORMAT,
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        "prefix": emulator.prefix,
        "kept": list(emulator.kept),
        "bottom": emulator.bottom,
        "top": emulator.top,
        "trainable": trainable,
    }
    return meta, tensors


def _field(meta: dict[str, Any], key: str, kind: type, item: type | None = None) -> Any:
    value = meta.get(key)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if ok and item is not None:
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if ok and kind is int:
        ok = 0 <= value < 1_000_000
    if not ok:
        raise ModelError(f"offsite-tuning: the server's emulator package has a bad '{key}' "
                         f"({type(value).__name__}, expected {kind.__name__})")
    return value


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _build(config, what: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many types for an inconsistent config
        raise ModelError(f"offsite-tuning: cannot build the {what} from the server's config: "
                         f"{_first_line(exc)}") from None


def emulator_from_package(meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                          device: torch.device, dtype: torch.dtype,
                          max_adapter_bytes: int | None = None) -> tuple[Emulator, Any]:
    """Rebuild the emulator (adapter layers zeroed until the first FIT) and the tokenizer.

    Everything in the package comes from a peer: the layout is checked on a weightless (meta
    device) copy before any memory is allocated, and the adapter layers, which are not in the
    package, may take at most `max_adapter_bytes` (float32), the most a FIT could carry.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if meta.get("format") != FORMAT:
        raise ModelError(f"offsite-tuning: the server's emulator package has format "
                         f"{str(meta.get('format'))[:20]!r}; this fedtune reads format {FORMAT}")
    config_dict = dict(_field(meta, "config", dict))
    kept = _field(meta, "kept", list, int)
    bottom, top = _field(meta, "bottom", int), _field(meta, "top", int)
    prefix = _field(meta, "prefix", str)
    trainable = _field(meta, "trainable", list, str)
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelError(f"offsite-tuning: the server's emulator is a {str(model_type)[:40]!r} model, "
                         "which this transformers does not ship; a shipped emulator never runs remote code")
    config_dict.pop("auto_map", None)  # code references from the peer are never followed
    try:
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    except Exception as exc:
        raise ModelError(f"offsite-tuning: the server's emulator config is invalid: {_first_line(exc)}") from None
    frozen = {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}
    with torch.device("meta"):
        skeleton = _build(config, "emulator")
    _check_layout(skeleton, frozen, trainable, max_adapter_bytes)
    found_prefix, layers = layer_list(skeleton)
    if found_prefix != prefix or len(layers) != len(kept) or bottom + top > len(kept):
        raise ModelError(f"offsite-tuning: the emulator's layers are {found_prefix} ({len(layers)}), "
                         f"the server said {prefix[:40]} ({len(kept)}, {bottom} + {top} adapter layers)")
    del skeleton
    model = _build(config, "emulator")
    _load_frozen(model, frozen, trainable)
    model.to(device=device, dtype=dtype)
    emulator = Emulator(model.eval(), list(kept), bottom, top, prefix)
    return emulator, _tokenizer(tensors)


def _check_layout(skeleton: nn.Module, frozen: dict[str, torch.Tensor], trainable: list[str],
                  max_adapter_bytes: int | None) -> None:
    """Names and shapes of the package against the config's model, before allocating it."""
    params = dict(skeleton.named_parameters())
    unknown = sorted(set(trainable) - set(params))
    if unknown:
        raise ModelError(f"offsite-tuning: adapter tensors {unknown[:3]} are not in the emulator")
    state = skeleton.state_dict()
    expected = set(state) - set(trainable)
    aliases = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)} - set(params)
    missing = sorted(expected - set(frozen) - aliases)
    extra = sorted(set(frozen) - set(state))
    if missing or extra:
        raise ModelError(f"offsite-tuning: the emulator package does not fit its config: missing "
                         f"{missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in frozen.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ModelError(f"offsite-tuning: emulator tensor {name} is {tuple(tensor.shape)}, "
                             f"the config says {tuple(state[name].shape)}")
    tied: dict[int, list[str]] = {}  # a config that ties weights (tie_word_embeddings) shares them
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for names in tied.values():
        sent = [frozen[n] for n in names if n in frozen]
        if any(not torch.equal(t, sent[0]) for t in sent[1:]):
            raise ModelError(f"offsite-tuning: the emulator config ties {names[:2]}, but the package's "
                             "tensors for them differ")
    adapter_bytes = 4 * sum(params[n].numel() for n in set(trainable))
    if max_adapter_bytes is not None and adapter_bytes > max_adapter_bytes:
        raise ModelError(f"offsite-tuning: the emulator's adapter layers would take {adapter_bytes} "
                         f"bytes, over transport.max_message_bytes ({max_adapter_bytes})")


@torch.no_grad()
def _load_frozen(model: nn.Module, frozen: dict[str, torch.Tensor], trainable: list[str]) -> None:
    model.load_state_dict(frozen, strict=False)
    wanted = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            param.zero_()  # replaced by the global adapter of the first FIT


_KEEP: list[str] = []


def _tokenizer(tensors: dict[str, torch.Tensor]):
    from transformers import AutoTokenizer

    from fedtune.models.loading import finish_tokenizer

    files = {k[len(TOKENIZER):]: v for k, v in tensors.items() if k.startswith(TOKENIZER)}
    if not files or len(files) > _MAX_TOKENIZER_FILES:
        raise ModelError(f"offsite-tuning: the emulator package has {len(files)} tokenizer files")
    directory = Path(tempfile.mkdtemp(prefix="fedtune-emulator-tokenizer-"))
    if not _KEEP:  # a slow tokenizer may read its files again later; removed at exit
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _KEEP])
    _KEEP.append(str(directory))
    for name, data in files.items():
        if not _FILE_NAME.match(name) or data.dtype != torch.uint8 or data.dim() != 1:
            raise ModelError(f"offsite-tuning: refusing tokenizer file {name[:40]!r} from the server")
        (directory / name).write_bytes(data.numpy().tobytes())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"offsite-tuning: cannot load the tokenizer the server sent: "
                         f"{_first_line(exc)}") from None
    return finish_tokenizer(tokenizer, "the server's emulator")
