"""Splitters: sizes, every index exactly once, determinism, skew, whole-category assignment."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedtune.data.splitters import (
    assign_categories,
    dirichlet_proportions,
    split_by_proportions,
    split_dirichlet,
    split_iid,
    split_meta,
    train_val_test_split,
)
from fedtune.errors import DataError


def flat(parts: list[list[int]]) -> list[int]:
    return sorted(i for part in parts for i in part)


def test_iid_sizes_cover_and_sorted():
    parts = split_iid(10, 3, seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert flat(parts) == list(range(10))
    assert all(p == sorted(p) for p in parts)
    assert sorted(map(len, split_iid(2, 3, seed=0))) == [0, 1, 1]


def test_iid_deterministic_by_seed():
    assert split_iid(50, 4, seed=7) == split_iid(50, 4, seed=7)
    assert split_iid(50, 4, seed=7) != split_iid(50, 4, seed=8)


def test_dirichlet_covers_every_index_once():
    labels = ["a"] * 37 + ["b"] * 21 + ["c"] * 5
    parts = split_dirichlet(labels, 4, alpha=0.5, seed=3)
    assert len(parts) == 4
    assert flat(parts) == list(range(len(labels)))
    assert parts == split_dirichlet(labels, 4, alpha=0.5, seed=3)
    assert parts != split_dirichlet(labels, 4, alpha=0.5, seed=4)


def _label_share_spread(alpha: float) -> float:
    labels = [f"c{k}" for k in range(8) for _ in range(200)]
    parts = split_dirichlet(labels, 4, alpha=alpha, seed=1)
    # for each label, the largest fraction of it that lands on one client
    per_label = []
    for k in range(8):
        counts = [sum(labels[i] == f"c{k}" for i in p) for p in parts]
        per_label.append(max(counts) / 200)
    return float(np.mean(per_label))


def test_dirichlet_large_alpha_balanced_small_alpha_skewed():
    assert _label_share_spread(1000.0) < 0.30  # near 1/4 each
    assert _label_share_spread(0.05) > 0.80  # most of a label on one client


def test_same_proportions_apply_to_each_split():
    proportions = dirichlet_proportions(["x", "y"], 2, alpha=1.0, seed=0)
    assert set(proportions) == {"x", "y"}
    assert all(np.isclose(p.sum(), 1.0) for p in proportions.values())
    proportions = {"x": np.array([0.75, 0.25]), "y": np.array([0.0, 1.0])}
    train_labels = ["x"] * 8 + ["y"] * 4
    train = split_by_proportions(train_labels, proportions, seed=0)
    assert [Counter(train_labels[i] for i in p) for p in train] == [{"x": 6}, {"x": 2, "y": 4}]
    test_labels = ["y", "x", "x", "x", "x"]
    test = split_by_proportions(test_labels, proportions, seed=1)
    assert [Counter(test_labels[i] for i in p) for p in test] == [{"x": 3}, {"x": 1, "y": 1}]


def test_dirichlet_needs_categories():
    with pytest.raises(DataError, match="data.split.method: iid"):
        split_dirichlet(["a", None, "b"], 2, alpha=1.0, seed=0)


def test_assign_categories_balances_by_size():
    sizes = {"a": 50, "b": 40, "c": 30, "d": 20, "e": 10}
    assignment = assign_categories(sizes, 2, seed=0)
    loads = Counter()
    for name, client in assignment.items():
        loads[client] += sizes[name]
    # greedy: a | b, c -> b's client (40 < 50), d -> a's (50 < 70), e -> either (70 = 70)
    assert sorted(loads.values()) == [70, 80]
    assert assignment["a"] != assignment["b"]
    assert assignment["c"] == assignment["b"] and assignment["d"] == assignment["a"]
    assert assignment == assign_categories(sizes, 2, seed=0)


def test_assign_categories_every_client_gets_one():
    sizes = {"big": 1000, "s1": 1, "s2": 1}
    assignment = assign_categories(sizes, 3, seed=5)
    assert sorted(assignment.values()) == [0, 1, 2]


def test_assign_categories_tie_break_depends_on_seed():
    sizes = {f"c{k}": 10 for k in range(6)}
    seen = {tuple(sorted(assign_categories(sizes, 3, seed=s).items())) for s in range(6)}
    assert len(seen) > 1


def test_split_meta_disjoint_categories():
    categories = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2
    parts = split_meta(categories, 2, seed=0)
    assert flat(parts) == list(range(14))
    per_client = [{categories[i] for i in p} for p in parts]
    assert not per_client[0] & per_client[1]


def test_meta_needs_enough_categories():
    with pytest.raises(DataError) as info:
        split_meta(["a", "a", "b"], 3, seed=0)
    assert "federation.clients" in str(info.value) and "data.split.method" in str(info.value)


def test_meta_needs_categories():
    with pytest.raises(DataError, match="no category column"):
        split_meta(["a", None], 1, seed=0)


def test_train_val_test_split_stratified():
    labels = ["a"] * 60 + ["b"] * 30 + [None] * 10
    train, val, test = train_val_test_split(labels, 0.1, 0.2, seed=0)
    assert sorted(train + val + test) == list(range(100))
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert Counter(labels[i] for i in test) == {"a": 12, "b": 6, None: 2}
    assert Counter(labels[i] for i in val) == {"a": 6, "b": 3, None: 1}
    assert (train, val, test) == train_val_test_split(labels, 0.1, 0.2, seed=0)
    assert (train, val, test) != train_val_test_split(labels, 0.1, 0.2, seed=1)


def test_train_val_test_split_totals_with_many_small_labels():
    labels = [f"c{k}" for k in range(20)]  # one example per label
    train, val, test = train_val_test_split(labels, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    assert sorted(train + val + test) == list(range(20))
