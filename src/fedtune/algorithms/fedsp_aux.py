"""FedSP's auxiliary model: the full model's first blocks repeated to its full depth (cross-layer
sharing), aligned with the full model by hidden-state distillation, shipped as a checked package.

The auxiliary model has the full model's depth and width, so a prefix prompt (key and value
vectors for every layer) fits both; its trainable body is only the `shared` distinct blocks
(embeddings, final norm and head are the full model's). Each repeated layer is its own module
(its own attention `layer_idx`, so per-layer prefixes stay apart) whose parameters are those of
block i mod `shared`.

The package is plain data for the message codec (no pickle, no code): `meta` holds the model
config as JSON and the layout, `tensors` the distinct weights (`model/<name>`) and the
tokenizer's files. A client rebuilds the model with a class transformers ships, ties its layers,
and checks every name and shape against the config before loading a byte. The full model never
leaves the server.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fedtune.algorithms.offsite_emulator import layer_list
from fedtune.algorithms.offsite_package import _build, _tokenizer, emulator_package
from fedtune.errors import ModelError

FORMAT = 1
MODEL = "model/"
TOKENIZER = "tokenizer/"


def tie_layers(layers: nn.ModuleList, shared: int) -> None:
    """Make layer i use the parameters of layer i mod `shared` (in place; modules stay distinct)."""
    if not 1 <= shared <= len(layers):
        raise ModelError(f"fedsp: shared_blocks={shared} must be between 1 and the model's {len(layers)} layers")
    for i in range(shared, len(layers)):
        source = dict(layers[i % shared].named_modules())
        for name, module in layers[i].named_modules():
            for pname, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[pname] = source[name]._parameters[pname]


def build_aux(full: nn.Module, shared: int) -> nn.Module:
    """A copy of `full` whose layers repeat its first `shared` blocks (the full model untouched)."""
    aux = copy.deepcopy(full)
    _, layers = layer_list(aux)
    tie_layers(layers, shared)
    return aux


def body(model: nn.Module, shared: int) -> dict[str, nn.Parameter]:
    """The auxiliary model's own trainable body: the parameters of its `shared` distinct blocks."""
    _, layers = layer_list(model)
    return {f"{i}.{n}": p for i in range(shared) for n, p in layers[i].named_parameters()}


def distill_hidden(full: nn.Module, aux: nn.Module, shared: int, batches, *, steps: int, lr: float,
                   device: torch.device) -> list[float]:
    """Train the auxiliary body so its last hidden states match the full model's (mean squared
    error per token, scaled by the teacher's RMS), on the server's data; returns the losses."""
    params = list(body(aux, shared).values())
    saved = {id(p): p.requires_grad for p in aux.parameters()}
    for p in aux.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    aux.train()
    try:
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with torch.no_grad():
                teacher = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[-1].float()
            student = aux(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True).hidden_states[-1].float()
            rms = teacher.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
            per_token = ((teacher - student) / rms).pow(2).mean(-1)
            mask = batch["attention_mask"].float()
            loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        optimizer.zero_grad(set_to_none=True)   # no stale gradient for the clients' first step
        aux.eval()
        for p in aux.parameters():
            p.requires_grad_(saved[id(p)])
    return losses


class _Whole:
    """The whole auxiliary model as offsite's packager sees an emulator (no trainable layers)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix, layers = layer_list(model)
        self.kept = list(range(len(layers)))
        self.bottom = self.top = 0


def aux_package(aux: nn.Module, tokenizer, shared: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors): the auxiliary model's distinct weights, its layout and the tokenizer."""
    frozen = {n: p.requires_grad for n, p in aux.named_parameters()}
    for p in aux.parameters():
        p.requires_grad_(False)   # every weight goes into the package
    try:
        meta, tensors = emulator_package(_Whole(aux), tokenizer)
    finally:
        for n, p in aux.named_parameters():
            p.requires_grad_(frozen[n])
    meta = {"format": FORMAT, "config": meta["config"], "prefix": meta["prefix"],
            "layers": len(meta["kept"]), "shared": shared}
    return meta, tensors


def _int(meta: dict[str, Any], key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ModelError(f"fedsp: the server's auxiliary-model package has a bad '{key}'")
    return value


def aux_from_package(meta: dict[str, Any], tensors: dict[str, torch.Tensor], *, device: torch.device,
                     dtype: torch.dtype) -> tuple[nn.Module, Any, int]:
    """Rebuild the auxiliary model (layers tied) and the tokenizer; returns them and `shared`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if meta.get("format") != FORMAT:
        raise ModelError(f"fedsp: the auxiliary-model package has format {str(meta.get('format'))[:20]!r}; "
                         f"this fedtune reads format {FORMAT}")
    config_dict = meta.get("config")
    if not isinstance(config_dict, dict):
        raise ModelError("fedsp: the auxiliary-model package has no model config")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelError(f"fedsp: the auxiliary model is a {str(model_type)[:40]!r} model, which this "
                         "transformers does not ship; a shipped model never runs remote code")
    config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    except Exception as exc:  # transformers raises many types for an inconsistent config
        raise ModelError(f"fedsp: the auxiliary model's config is invalid: {str(exc)[:200]}") from None
    n_layers = _int(meta, "layers", 1, 10_000)
    shared = _int(meta, "shared", 1, n_layers)
    weights = {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}
    with torch.device("meta"):
        skeleton = _build(config, "auxiliary model")
    prefix, layers = layer_list(skeleton)
    if prefix != meta.get("prefix") or len(layers) != n_layers:
        raise ModelError(f"fedsp: the auxiliary model's layers are {prefix} ({len(layers)}), the server "
                         f"said {str(meta.get('prefix'))[:40]} ({n_layers})")
    tie_layers(layers, shared)
    expected = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    every = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
    expected.update({n: tuple(b.shape) for n, b in skeleton.state_dict().items() if n not in every})
    if set(weights) != set(expected):
        raise ModelError(f"fedsp: the auxiliary-model package does not fit its config: missing "
                         f"{sorted(set(expected) - set(weights))[:3]}, unexpected {sorted(set(weights) - set(expected))[:3]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name]:
            raise ModelError(f"fedsp: auxiliary tensor {name} is {tuple(tensor.shape)}, the config says "
                             f"{expected[name]}")
    del skeleton
    model = _build(config, "auxiliary model")
    tie_layers(layer_list(model)[1], shared)
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    model.to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), _tokenizer(tensors), shared

