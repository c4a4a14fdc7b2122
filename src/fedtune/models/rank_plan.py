"""Heterogeneous LoRA ranks: each client's rank, and its rank-r view of the one shared model.

The model is built once, at the largest rank `r` (adapter.r). A client of rank r_k uses the first
r_k components: its A rows and B columns; the others are held at zero, which keeps them at zero
through training (both of a component's gradients are products with the other, zero, factor).
The client's LoRA scale is its own α/r_k (set on peft's layers whenever its tensors are loaded).

On the wire every party writes LoRA factors in ONE frame, that of the full rank: B is multiplied
by s_k/s_max (s = α/r), so that s_max·B_wire·A_wire is the client's real ΔW = s_k·B_k·A_k. The
server and the aggregators then never need α: zero-padding, stacking and products are plain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedtune.errors import ModelError
from fedtune.seeding import derive_seed

State = dict[str, torch.Tensor]
A_TAG, B_TAG = ".lora_A.", ".lora_B."


def client_name(index: int) -> str:
    return f"client_{index}"


def client_ranks(spec: Any, n_clients: int, seed: int) -> dict[str, int]:
    """Client name -> LoRA rank from adapter.rank_per_client (a list or a RankRule)."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != n_clients:
            raise ValueError(f"adapter.rank_per_client lists {len(spec)} ranks for {n_clients} clients")
        return {client_name(i): int(r) for i, r in enumerate(spec)}
    ranks = [int(r) for r in spec.ranks]
    if spec.resources is not None:  # a rule: the fewer resources, the smaller the rank
        if len(spec.resources) != n_clients:
            raise ValueError(f"adapter.rank_per_client.resources has {len(spec.resources)} entries "
                             f"for {n_clients} clients")
        order = sorted(range(n_clients), key=lambda i: (spec.resources[i], i))
        levels = sorted(ranks)
        out = {}
        for place, i in enumerate(order):  # equal-sized groups of clients, rank by group
            out[client_name(i)] = levels[min(len(levels) - 1, place * len(levels) // n_clients)]
        return out
    rng = np.random.default_rng(derive_seed(seed, "rank-per-client"))
    p = None
    if spec.weights is not None:
        w = np.asarray(spec.weights, dtype=float)
        p = w / w.sum()
    drawn = rng.choice(len(ranks), size=n_clients, p=p)
    return {client_name(i): ranks[int(j)] for i, j in enumerate(drawn)}


def is_a(name: str) -> bool:
    return A_TAG in name


def is_b(name: str) -> bool:
    return B_TAG in name


def truncate(state: State, rank: int) -> State:
    """The first `rank` components: A[:rank, :], B[:, :rank]; other tensors unchanged."""
    out = {}
    for name, t in state.items():
        if is_a(name):
            out[name] = t[:rank].clone()
        elif is_b(name):
            out[name] = t[:, :rank].clone()
        else:
            out[name] = t
    return out


def pad(state: State, rank: int) -> State:
    """Zero-pad A rows and B columns up to `rank` components."""
    out = {}
    for name, t in state.items():
        if is_a(name) and t.shape[0] < rank:
            out[name] = torch.cat([t, t.new_zeros(rank - t.shape[0], *t.shape[1:])], dim=0)
        elif is_b(name) and t.shape[1] < rank:
            out[name] = torch.cat([t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)
        else:
            out[name] = t
    return out


def with_update(global_state: State, update: State) -> State:
    """A client's local adapter: its rank's part of the global adapter plus its update (the
    update's LoRA shapes say the client's rank; the full global state without LoRA factors).
    Only the update's tensors: those the server keeps to itself or sends only are not in it."""
    ranks = {t.shape[0] for n, t in update.items() if is_a(n)}
    base = truncate(global_state, ranks.pop()) if len(ranks) == 1 else global_state
    return {k: base[k] + update[k].to(base[k].dtype) for k in update}


def rank_of(state: State) -> int:
    """The rank of a state's LoRA factors (all A tensors share it)."""
    ranks = {t.shape[0] for n, t in state.items() if is_a(n)}
    if len(ranks) != 1:
        raise ModelError(f"LoRA factors of mixed ranks {sorted(ranks)} in one state")
    return ranks.pop()


def lora_layers(model: torch.nn.Module) -> list[Any]:
    """peft's LoRA layers of the model (those with a `scaling` dict)."""
    return [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)
            and hasattr(m, "lora_A")]


class RankSlot:
    """An AdapterSlot seen at rank `rank`, in the wire frame of rank `r_max` (module doc).

    The model's LoRA may be built at `r_max` (simulation: one model for every client) or at the
    client's own rank (a deployed client); `get` returns the first `rank` components (B rescaled
    to the frame), `set` writes them back, zeroes any further ones and sets every LoRA layer's
    scale to α/rank. `params` and `model` are the model's, for local procedures.
    """

    def __init__(self, slot: Any, rank: int, r_max: int, alpha: float):
        if not 1 <= rank <= r_max:
            raise ModelError(f"adapter.rank_per_client: rank {rank} is outside 1..adapter.r={r_max}")
        self.slot = slot
        self.model = slot.model
        self.params = slot.params
        ranks = {p.shape[0] for n, p in self.params.items() if is_a(n)}
        if not ranks:
            raise ModelError("adapter.rank_per_client needs LoRA factors (adapter.method: lora)")
        self.model_rank = max(ranks)
        if rank > self.model_rank:
            raise ModelError(f"rank {rank} is above the model's LoRA rank {self.model_rank}")
        self.rank, self.r_max, self.alpha = rank, r_max, alpha
        self.to_wire = r_max / rank   # s_k / s_max = (α/r_k) / (α/r_max)
        self.frame_scale = alpha / r_max   # s_max: the scale of the wire frame
        self.layers = lora_layers(slot.model)

    def get(self) -> State:
        state = truncate(self.slot.get(), self.rank)
        return {n: t * self.to_wire if is_b(n) else t for n, t in state.items()}

    @torch.no_grad()
    def set(self, state: State) -> None:
        for name, t in state.items():
            got = t.shape[0] if is_a(name) else t.shape[1] if is_b(name) else self.rank
            if got != self.rank:
                raise ModelError(f"{name}: rank {got}, this client's rank is {self.rank}")
        local = {n: t / self.to_wire if is_b(n) else t for n, t in state.items()}
        self.slot.set(pad(local, self.model_rank))
        for layer in self.layers:
            for adapter in layer.scaling:
                layer.scaling[adapter] = self.alpha / self.rank

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.get().values())

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.get().values())


def wrap_slot(slot: Any, adapter: Any, rank: int) -> RankSlot:
    """The rank-`rank` view of `slot` for the recipe's adapter section."""
    return RankSlot(slot, rank, adapter.r, adapter.alpha)

