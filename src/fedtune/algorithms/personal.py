"""What the personalised algorithms share: the split of the adapter into a shared and a personal
part (a view whose wire carries the shared part only), and fine-tuning the global model on a
client's own data (FT, and the holdout clients' adaptation)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedtune.algorithms.base import LocalContext, PersonalContext, State
from fedtune.errors import FedtuneError, ModelError

PERSONAL = "personal/"   # the prefix of a client's personal tensors in its persistent state


def matching(names: Iterable[str], parts: list[str]) -> set[str]:
    """The names that contain one of `parts`."""
    return {n for n in names if any(p in n for p in parts)}


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter belongs to (`...layers.3.self_attn...` -> 3), if any."""
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def top_layer_names(names: Iterable[str], top: int) -> set[str]:
    """The names in the `top` highest-numbered layers."""
    names = list(names)
    layers = sorted({i for n in names if (i := layer_index(n)) is not None})
    if not layers:
        raise ModelError("federation.options.top_layers: no trainable tensor has a layer number in "
                         f"its name (e.g. {names[:2]}); name the personal tensors with options.personal")
    keep = set(layers[-top:])
    return {n for n in names if layer_index(n) in keep}


def check_split(personal: set[str], names: list[str], key: str) -> None:
    """A split leaves at least one tensor on each side."""
    if not personal:
        raise ModelError(f"{key}: matches no trainable tensor of the model (e.g. {names[:2]})")
    if personal >= set(names):
        raise ModelError(f"{key}: matches every trainable tensor; nothing would be shared")


class PartialView:
    """The global state is the shared part of the adapter; the personal part never travels.

    `load` writes the shared tensors and resets the personal ones to their initial values (the same
    on every party: the adapter's initial values derive from the recipe seed), so one client's
    personal tensors never leak into another's turn on the shared model, nor into the server's
    global model (which carries the initial personal part).
    """

    def __init__(self, slot: Any, personal: set[str]):
        self.slot = slot
        self.personal = set(personal)
        everything = slot.get()
        self.shared = [n for n in everything if n not in self.personal]
        self.initial_personal = {n: everything[n] for n in everything if n in self.personal}

    def initial(self) -> State:
        state = self.slot.get()
        return {n: state[n] for n in self.shared}

    def load(self, state: State) -> None:
        if set(state) != set(self.shared):
            missing = sorted(set(self.shared) - set(state))[:3]
            extra = sorted(set(state) - set(self.shared))[:3]
            raise ModelError(f"shared adapter state does not match: missing {missing}, unexpected {extra}")
        self.slot.overlay({**state, **self.initial_personal})


def personal_part(state: State) -> State:
    """The personal tensors a client keeps in its persistent state (prefix removed)."""
    return {k[len(PERSONAL):]: v for k, v in state.items() if k.startswith(PERSONAL)}


def keep_personal(state: State, tensors: State) -> None:
    """Store (replace) the personal tensors in a client's persistent state, as CPU copies."""
    for k in [k for k in state if k.startswith(PERSONAL)]:
        del state[k]
    state.update({PERSONAL + n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()})


def trainable_only(params: dict[str, torch.nn.Parameter], names: set[str]) -> Callable[[], None]:
    """Make only `names` trainable; returns the function that restores the previous flags."""
    before = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)

    def restore() -> None:
        for n, p in params.items():
            p.requires_grad_(before[n])

    return restore


def fine_tune(ctx: PersonalContext, steps: int, lr: float | None) -> State:
    """FT: `steps` local steps from the global model now in the slot (its own data, a seed of
    its own); the adapted tensors, read out. The slot is left changed: the client reloads the
    global model before its next use, so the fine-tuning never carries into a later round."""
    if not ctx.train:
        raise FedtuneError(f"client '{ctx.client}' has no training examples to fine-tune on")
    ctx.trainer.train(ctx.train, lr=lr if lr is not None else ctx.trainer.section.lr,
                      seed=ctx.seed, steps=steps)
    return ctx.slot.get()


class HoldoutLocal:
    """A holdout (unseen) client: it never trains in the federation; at each evaluation it adapts
    the global model with `steps` local steps (federation.holdout_steps) and reports the result as
    its personal model. Of the algorithm's own procedure it keeps only the tensor specs."""

    def __init__(self, inner: Any, steps: int):
        self.inner = inner
        self.steps = steps

    def server_tensor_specs(self, adapter: dict[str, Any]) -> dict[str, Any]:
        return self.inner.server_tensor_specs(adapter)

    def fit(self, ctx: LocalContext, global_state: State):
        raise FedtuneError(f"client '{ctx.client}' is a holdout client (federation.holdout_clients) "
                           "and never trains; the server should not ask it to")

    def personal(self, ctx: PersonalContext) -> State | None:
        return fine_tune(ctx, self.steps, None) if self.steps > 0 else {}


def shared_update(local: State, global_state: State) -> State:
    """local − global over the shared (travelling) tensors only."""
    return {k: local[k] - g.to(local[k].dtype) for k, g in global_state.items()}
