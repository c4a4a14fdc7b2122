"""FLoRA (Wang et al., NeurIPS'24): stack the clients' LoRA factors so the aggregate is exact.

With B_s = [B_1 … B_K] (columns) and A_s = [p_1·A_1; …; p_K·A_K] (rows), B_s·A_s = Σ_k p_k·B_k·A_k
exactly, at rank Σ r_k; the clients may hold different ranks (adapter.rank_per_client). The
stacked rank grows every round, so the server merges each round's product into one global delta
ΔW_g it keeps (a dense tensor per adapted weight, in the global state under `down/flora/`), and
every client trains a fresh LoRA (A as initialised, B = 0) of its own rank on base + ΔW_g.

ΔW_g travels to the clients only (`down/` names: wire.DOWN_ONLY), with every FIT and EVALUATE,
so a client that skipped rounds is never stale; a client uploads only its factors. The downlink
is therefore dense (the price of exactness without clients keeping state); each round's summary
also reports what shipping the stacked factors instead would cost (`flora_stacked_rank`,
`flora_stacked_bytes`). Factors are in the full rank's frame (models/rank_plan.py): the model's
base weight is W0 + (α/r)·ΔW_g.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.fedavg import client_weights
from fedtune.algorithms.flexlora import lora_pairs
from fedtune.algorithms.options import FLoRAConfig
from fedtune.algorithms.party import StandardParty
from fedtune.errors import ModelError
from fedtune.models.rank_plan import is_a, is_b, with_update
from fedtune.wire import DOWN_ONLY

DELTA = DOWN_ONLY + "flora/"   # + the adapted module's name: its ΔW_g (out × in), in the frame
DELTA_FILE = "flora_delta.safetensors"
PEFT_PREFIX = "base_model.model."   # peft's wrapper around the base model's own names


def stack(local_states: Sequence[State], weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """lora_A name -> (B_s, A_s): the clients' factors stacked, B_s·A_s = Σ p_k·B_k·A_k
    (p_k = the weights normalised)."""
    total = float(sum(weights))
    if not local_states or total <= 0:
        raise ValueError("stack needs clients with positive total weight")
    out = {}
    for a_name, b_name in lora_pairs(list(local_states[0])).items():
        b_s = torch.cat([s[b_name].double() for s in local_states], dim=1)
        a_s = torch.cat([(w / total) * s[a_name].double() for s, w in zip(local_states, weights)], dim=0)
        out[a_name] = (b_s, a_s)
    return out


def module_of(a_name: str) -> str:
    """`x.q_proj.lora_A.default.weight` -> `x.q_proj`."""
    return a_name.split(".lora_A.", 1)[0]


def flora_aggregate(global_state: State, local_states: Sequence[State],
                    weights: Sequence[float]) -> tuple[State, dict[str, Any]]:
    """The new global state (ΔW_g += B_s·A_s; a fresh LoRA: A kept, B = 0; other tensors averaged)
    and the stacked factors' size, for the round's summary."""
    stacked = stack(local_states, weights)
    total = float(sum(weights))
    out: State = {}
    rank = bytes_ = 0
    for a_name, (b_s, a_s) in stacked.items():
        key = DELTA + module_of(a_name)
        out[key] = (global_state[key].double() + b_s @ a_s).to(global_state[key].dtype)
        rank = a_s.shape[0]
        bytes_ += (a_s.numel() + b_s.numel()) * global_state[a_name].element_size()
    for name, g in global_state.items():
        if name in out:
            continue
        if is_a(name):
            out[name] = g.clone()              # the fresh LoRA's A: as initialised
        elif is_b(name):
            out[name] = torch.zeros_like(g)    # ... and B = 0
        elif not name.startswith(DOWN_ONLY):
            out[name] = sum((w / total) * s[name].double() for s, w in zip(local_states, weights)).to(g.dtype)
        else:
            out[name] = g
    return out, {"flora_stacked_rank": rank, "flora_stacked_bytes": bytes_}


@plain
class FLoRA:
    def __init__(self, config: FLoRAConfig):
        self.config = config
        self.last: dict[str, Any] = {}

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        weights = client_weights(updates, self.config.weighting)
        locals_ = [with_update(global_state, u.tensors) for u in updates]
        new, self.last = flora_aggregate(global_state, locals_, weights)
        return new

    def round_metrics(self) -> dict[str, Any]:
        return dict(self.last)


_ORIGINAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> {module: W0}


class FLoRAView:
    """The global state is the LoRA factors (of this party's rank) plus ΔW_g; loading it writes
    W0 + (α/r)·ΔW_g into each adapted base weight (W0 kept once per model, shared by the
    simulated clients) and the factors through the slot."""

    def __init__(self, slot: Any):
        self.slot = slot
        model = slot.model
        modules = dict(model.named_modules())
        self.layers = {}
        for a_name in (n for n in slot.params if is_a(n)):
            name = module_of(a_name)
            layer = modules.get(name)
            if not isinstance(getattr(layer, "scaling", None), dict) or not hasattr(layer, "base_layer"):
                raise ModelError(f"flora: {a_name} is not a LoRA layer's factor (adapter.method lora)")
            self.layers[name] = layer
        if model not in _ORIGINAL:
            _ORIGINAL[model] = {n: layer.base_layer.weight.detach().clone() for n, layer in self.layers.items()}
        self.original = _ORIGINAL[model]
        any_layer = next(iter(self.layers.values()))
        adapter = next(iter(any_layer.lora_alpha))
        # α / r of the full rank: the wire frame's (a deployed client's LoRA may be smaller)
        self.scale = getattr(slot, "frame_scale", None) or any_layer.lora_alpha[adapter] / any_layer.r[adapter]

    def initial(self) -> State:
        deltas = {DELTA + n: torch.zeros(w.shape, dtype=torch.float32) for n, w in self.original.items()}
        return {**self.slot.get(), **deltas}

    @torch.no_grad()
    def load(self, state: State) -> None:
        self.slot.set({k: v for k, v in state.items() if not k.startswith(DOWN_ONLY)})
        for name, layer in self.layers.items():
            w0 = self.original[name]
            delta = state[DELTA + name].to(w0.device, torch.float32)
            layer.base_layer.weight.copy_((w0.float() + self.scale * delta).to(w0.dtype))


class FLoRAParty:
    """The standard party, and beside the final PEFT adapter (a fresh LoRA) the merged global
    delta (α/r)·ΔW_g per adapted weight in `flora_delta.safetensors` (add it to the base)."""

    attaches_adapter = True

    def __init__(self, recipe: Any):
        self.scale = recipe.adapter.alpha / recipe.adapter.r

    def save(self, state: State, directory: Path) -> bool:
        directory.mkdir(parents=True, exist_ok=True)
        deltas = {k.removeprefix(DELTA).removeprefix(PEFT_PREFIX) + ".weight": (self.scale * v.float()).contiguous()
                  for k, v in state.items() if k.startswith(DELTA)}
        save_file(deltas, str(directory / DELTA_FILE), metadata={"format": "pt"})
        return False   # the PEFT adapter is saved as usual

    server_model = StandardParty.server_model
    downloads = StandardParty.downloads
    client_downloads = StandardParty.client_downloads
    client_model = StandardParty.client_model
    keep = StandardParty.keep
    evaluate_global = StandardParty.evaluate_global
    eval_model = StandardParty.eval_model
    after_round = StandardParty.after_round
    state_dict = StandardParty.state_dict
    load_state_dict = StandardParty.load_state_dict
    summary = StandardParty.summary
    report = StandardParty.report


SPEC = register("flora", lambda config: FLoRA(config), view=lambda config, slot: FLoRAView(slot),
                party=lambda config, recipe: FLoRAParty(recipe))
