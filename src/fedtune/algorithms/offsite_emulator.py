"""Offsite-tuning (as in FederatedScope-LLM): an emulator the model owner can hand out instead of the model.

The full model's layers [bottom, n − top) are its frozen core; the emulator keeps round(m·(1 − drop))
evenly strided layers of that core (m = n − bottom − top) and all of the `bottom` first and `top`
last layers, which are the trainable adapter. Clients fine-tune the adapter on top of the emulator;
the server plugs the adapter layers back into the full model, mapped by depth (adapter layer j of
the emulator is layer j of the full model at the bottom, layer n − top + j at the top), never by
position in a list of names. Optionally the server first distils the emulator's core towards the
full model's on data it holds (`distill`).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.errors import ModelError

log = logging.getLogger("fedtune.offsite")

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of transformer blocks (e.g. `model.layers`, `transformer.h`) and its path."""
    n = _layer_count(model.config)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ModelError(f"offsite-tuning: cannot find the one list of {n} transformer layers in "
                         f"{type(model).__name__} (candidates: {[name for name, _ in found]})")
    return found[0]


def _layer_count(config) -> int:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ModelError(f"offsite-tuning: the model config has none of {_LAYER_COUNT_KEYS}")


def kept_layers(n_layers: int, bottom: int, top: int, drop_ratio: float) -> list[int]:
    """Full-model indices of the emulator's layers: all adapter layers, and evenly strided core ones."""
    core = n_layers - bottom - top
    if bottom < 0 or top < 0 or bottom + top == 0:
        raise ModelError("offsite-tuning: adapter_bottom + adapter_top must be at least 1")
    if core < 1:
        raise ModelError(f"offsite-tuning: the model has {n_layers} layers, too few for "
                         f"{bottom} bottom + {top} top adapter layers and a core")
    keep = max(1, round(core * (1.0 - drop_ratio)))
    middle = [bottom + (i * core) // keep for i in range(keep)]
    return list(range(bottom)) + middle + list(range(n_layers - top, n_layers))


@dataclass
class Emulator:
    model: nn.Module          # the emulator (what clients get)
    kept: list[int]           # full-model index of each emulator layer
    bottom: int
    top: int
    prefix: str               # path of the layer list, e.g. "model.layers"

    @property
    def adapter_layers(self) -> dict[int, int]:
        """Emulator layer index → full-model layer index, for the trainable adapter layers."""
        n = len(self.kept)
        return {i: self.kept[i] for i in [*range(self.bottom), *range(n - self.top, n)]}

    def core_layers(self) -> list[int]:
        n = len(self.kept)
        return list(range(self.bottom, n - self.top))


def build_emulator(full: nn.Module, bottom: int, top: int, drop_ratio: float) -> Emulator:
    """A copy of `full` with only the kept layers; only the adapter layers train."""
    prefix, layers = layer_list(full)
    kept = kept_layers(len(layers), bottom, top, drop_ratio)
    emulator = copy.deepcopy(full)
    parent = emulator.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else emulator
    attr = prefix.rsplit(".", 1)[-1]
    setattr(parent, attr, nn.ModuleList([copy.deepcopy(layers[i]) for i in kept]))
    config = emulator.config
    for key in _LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, len(kept))
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():  # caches are indexed by layer position
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    result = Emulator(emulator, kept, bottom, top, prefix)
    trainable = {f"{prefix}.{i}." for i in result.adapter_layers}
    for name, param in emulator.named_parameters():
        param.requires_grad_(any(name.startswith(p) for p in trainable))
    full.requires_grad_(False)
    return result


_INDEX = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def plug_in_names(emulator: Emulator, names: list[str]) -> dict[str, str]:
    """Emulator adapter parameter name → the full model's name of the same tensor, by depth."""
    depth = emulator.adapter_layers
    mapping = {}
    for name in names:
        m = _INDEX.match(name)
        if m is None or m["prefix"] != emulator.prefix or int(m["index"]) not in depth:
            raise ModelError(f"offsite-tuning: {name} is not a parameter of an adapter layer")
        mapping[name] = f"{m['prefix']}.{depth[int(m['index'])]}.{m['rest']}"
    return mapping


@torch.no_grad()
def plug_in(full: nn.Module, emulator: Emulator, adapter: dict[str, torch.Tensor]) -> None:
    """Copy the adapter layers' tensors into the full model at their depths."""
    params = dict(full.named_parameters())
    for src, dst in plug_in_names(emulator, sorted(adapter)).items():
        if params[dst].shape != adapter[src].shape:
            raise ModelError(f"offsite-tuning: {src} {tuple(adapter[src].shape)} does not fit {dst} "
                             f"{tuple(params[dst].shape)}")
        params[dst].copy_(adapter[src])


def distill(full: nn.Module, emulator: Emulator, batches, *, steps: int, lr: float,
            lm_weight: float, kd_weight: float, device: torch.device) -> list[float]:
    """Align the emulator's core with the full model's on the server's data; returns the losses.

    Loss = lm_weight·LM(emulator) + kd_weight·mean ‖(h_full − h_emu) / rms(h_full)‖² over tokens, with h
    the hidden state entering the first top adapter layer (the core's output) in both models.
    Only the core layers train; the adapter layers stay as in the full model.
    """
    model = emulator.model
    core = [f"{emulator.prefix}.{i}." for i in emulator.core_layers()]
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(c) for c in core))
        if p.requires_grad:
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n_full, n_emu = _layer_count(full.config), len(emulator.kept)
    losses = []
    model.train()
    try:
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with torch.no_grad():
                teacher = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states[n_full - emulator.top]
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], output_hidden_states=True)
            student = out.hidden_states[n_emu - emulator.top]
            rms = teacher.float().pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
            per_token = ((teacher.float() - student.float()) / rms).pow(2).mean(-1)
            mask = batch["attention_mask"].float()
            kd = (per_token * mask).sum() / mask.sum().clamp(min=1)
            loss = lm_weight * out.loss + kd_weight * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return losses


def state_bytes(module: nn.Module, only_frozen: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if not (only_frozen and p.requires_grad))
