"""LoRA-aware aggregation: average the products B·A, then re-factorise by truncated SVD.

Averaging A and B separately (plain FedAvg) is not the average of the products:
mean(B_i)·mean(A_i) ≠ mean(B_i·A_i). Here the server averages the products and splits the
result back into rank-r factors, B' = U_r·√S_r and A' = √S_r·V_rᵀ — exact whenever the averaged
product has rank ≤ r, the best rank-r approximation (Eckart–Young) otherwise. The products do
not depend on each client's rank, so clients may use different LoRA ranks (as in FlexLoRA,
Bai et al. 2024). Tensors that are not LoRA factors are averaged as in FedAvg.

With adapter.rank_per_client the global factors keep the largest rank, ordered by singular
value, so a client of rank r_k receiving the first r_k components (runtime/client_shapes.py)
gets the truncated SVD of the averaged ΔW at its rank. The factors travel in the full rank's
frame (models/rank_plan.py), so each client's own scale α/r_k is accounted for, not hard-coded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.fedavg import client_weights
from fedtune.algorithms.options import FlexLoRAConfig
from fedtune.models.rank_plan import with_update

A_TAG, B_TAG = "lora_A", "lora_B"


def lora_pairs(names: Sequence[str]) -> dict[str, str]:
    """lora_A tensor name -> its lora_B partner, for every complete pair among `names`."""
    present = set(names)
    pairs = {}
    for name in names:
        if f".{A_TAG}." in name:
            partner = name.replace(f".{A_TAG}.", f".{B_TAG}.")
            if partner in present:
                pairs[name] = partner
    return pairs


def refactorize(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the given rank with B·A the best rank-`rank` approximation of `product`."""
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    if rank > s.numel():  # a rank above the product's size: pad with zeros
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - s.numel())], dim=1)
        a = torch.cat([a, a.new_zeros(rank - s.numel(), a.shape[1])], dim=0)
    return b, a


def flexlora_aggregate(global_state: State, local_states: Sequence[tuple[State, float]]) -> State:
    """New global state from the clients' LOCAL states (not deltas) and their weights.

    Each client's A/B may have its own rank; the result has the global state's rank.
    """
    total = float(sum(w for _, w in local_states))
    if not local_states or total <= 0:
        raise ValueError("flexlora_aggregate needs updates with positive total weight")
    pairs = lora_pairs(list(global_state))
    in_pairs = set(pairs) | set(pairs.values())
    out: State = {}
    for a_name, b_name in pairs.items():
        product = sum((w / total) * (s[b_name].double() @ s[a_name].double()) for s, w in local_states)
        b, a = refactorize(product, global_state[a_name].shape[0])
        out[a_name] = a.to(global_state[a_name].dtype)
        out[b_name] = b.to(global_state[b_name].dtype)
    for name, g in global_state.items():
        if name not in in_pairs:
            mean = sum((w / total) * s[name].double() for s, w in local_states)
            out[name] = mean.to(g.dtype)
    return out


@plain
class FlexLoRA:
    def __init__(self, config: FlexLoRAConfig):
        self.config = config

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        weights = client_weights(updates, self.config.weighting)
        # with adapter.rank_per_client each update has its client's rank (models/rank_plan.py)
        locals_ = [(with_update(global_state, u.tensors), w) for u, w in zip(updates, weights)]
        return flexlora_aggregate(global_state, locals_)


SPEC = register("flexlora", lambda config: FlexLoRA(config))
