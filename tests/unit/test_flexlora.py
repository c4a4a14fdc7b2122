"""LoRA-aware aggregation: the product of the aggregated factors is the average of the products."""

from __future__ import annotations

import torch

from fedtune.algorithms.fedavg import fedavg_aggregate
from fedtune.algorithms.flexlora import flexlora_aggregate, lora_pairs, refactorize

A = "m.layers.0.q_proj.lora_A.default.weight"
B = "m.layers.0.q_proj.lora_B.default.weight"


def _client(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 5, generator=g, dtype=torch.float64),
            B: torch.randn(4, rank, generator=g, dtype=torch.float64),
            "m.norm.weight": torch.randn(5, generator=g, dtype=torch.float64)}


def test_pairs_are_found_by_name():
    assert lora_pairs([A, B, "x.lora_A.default.weight"]) == {A: B}


def test_exact_when_the_mean_product_fits_the_rank():
    c1, c2 = _client(2, 1), _client(2, 2)
    global_state = {k: torch.zeros(4, 4, dtype=torch.float64) if k == B else
                    torch.zeros(4, 5, dtype=torch.float64) if k == A else torch.zeros(5, dtype=torch.float64)
                    for k in c1}  # global rank 4 ≥ rank of the mean of two rank-2 products
    out = flexlora_aggregate(global_state, [(c1, 1.0), (c2, 3.0)])
    expected = 0.25 * c1[B] @ c1[A] + 0.75 * c2[B] @ c2[A]
    torch.testing.assert_close(out[B] @ out[A], expected)
    torch.testing.assert_close(out["m.norm.weight"], 0.25 * c1["m.norm.weight"] + 0.75 * c2["m.norm.weight"])
    # ... whereas averaging the factors separately is not the average of the products
    zeros = {k: torch.zeros_like(v) for k, v in c1.items()}
    naive = fedavg_aggregate(zeros, [(c1, 1.0), (c2, 3.0)])
    assert (naive[B] @ naive[A] - expected).abs().max() > 1e-3


def test_clients_with_different_ranks():
    c1, c2 = _client(1, 3), _client(3, 4)
    global_state = {A: torch.zeros(4, 5, dtype=torch.float64), B: torch.zeros(4, 4, dtype=torch.float64),
                    "m.norm.weight": torch.zeros(5, dtype=torch.float64)}
    out = flexlora_aggregate(global_state, [(c1, 1.0), (c2, 1.0)])
    assert out[A].shape == (4, 5) and out[B].shape == (4, 4)
    torch.testing.assert_close(out[B] @ out[A], 0.5 * (c1[B] @ c1[A] + c2[B] @ c2[A]))


def test_truncation_gives_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    product = torch.randn(6, 5, generator=g, dtype=torch.float64)
    b, a = refactorize(product, 2)
    u, s, vh = torch.linalg.svd(product)
    torch.testing.assert_close(b @ a, (u[:, :2] * s[:2]) @ vh[:2])
