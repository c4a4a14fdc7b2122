"""Splitters: sizes, every index exactly once, determinism, skew, whole-category assignment."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedtune.data.splitters import (
    assign_categories,
    dirichlet_proportions,
    quantity_sizes,
    split_by_proportions,
    split_dirichlet,
    split_iid,
    split_meta,
    split_quantity,
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
    parts = split_dirichlet({"train": labels}, 4, alpha=0.5, seed=3)["train"]
    assert len(parts) == 4
    assert flat(parts) == list(range(len(labels)))
    assert parts == split_dirichlet({"train": labels}, 4, alpha=0.5, seed=3)["train"]
    assert parts != split_dirichlet({"train": labels}, 4, alpha=0.5, seed=4)["train"]


def _label_share_spread(alpha: float) -> float:
    labels = [f"c{k}" for k in range(8) for _ in range(200)]
    parts = split_dirichlet({"train": labels}, 4, alpha=alpha, seed=1)["train"]
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
        split_dirichlet({"train": ["a", None, "b"]}, 2, alpha=1.0, seed=0)


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
    parts = split_meta({"train": categories}, 2, seed=0)["train"]
    assert flat(parts) == list(range(14))
    per_client = [{categories[i] for i in p} for p in parts]
    assert not per_client[0] & per_client[1]


def test_meta_needs_enough_categories():
    with pytest.raises(DataError) as info:
        split_meta({"train": ["a", "a", "b"]}, 3, seed=0)
    assert "federation.clients" in str(info.value) and "data.split.method" in str(info.value)


def test_meta_needs_categories():
    with pytest.raises(DataError, match="no category column"):
        split_meta({"train": ["a", None]}, 1, seed=0)


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


def test_meta_by_another_column_names_it():
    with pytest.raises(DataError, match="column 'user'.*data.split.by"):
        split_meta({"train": ["a", None]}, 1, seed=0, by="user")


def test_dirichlet_and_meta_use_one_map_for_every_part():
    labels = {"train": ["a"] * 6 + ["b"] * 6 + ["c"] * 6, "test": ["a", "b", "c"] * 2}
    meta = split_meta(labels, 3, seed=1)
    for client in range(3):  # each client holds the same single label in train and test
        train_labels = {labels["train"][i] for i in meta["train"][client]}
        test_labels = {labels["test"][i] for i in meta["test"][client]}
        assert len(train_labels) == 1 and train_labels == test_labels


def test_quantity_sizes_by_hand():
    assert quantity_sizes(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    # quotas 3.5, 3.5, 3.0 -> floors 3, 3, 3 and one left for the lower client of the tie
    assert quantity_sizes(10, [0.35, 0.35, 0.30]) == [4, 3, 3]
    # one each first, then 7 by shares: 6.3, 0.7, 0.0 -> 6, 1, 0 -> 7, 2, 1
    assert quantity_sizes(10, [0.9, 0.1, 0.0], minimum=1) == [7, 2, 1]
    # fewer examples than clients: no minimum
    assert quantity_sizes(2, [0.9, 0.1, 0.0], minimum=1) == [2, 0, 0]


def test_quantity_split_follows_one_dirichlet_draw():
    from fedtune.seeding import derive_seed

    parts = split_quantity({"train": 100, "test": 20}, 3, alpha=0.5, seed=7)
    shares = np.random.default_rng(derive_seed(7, "data", "quantity")).dirichlet([0.5] * 3)
    assert [len(p) for p in parts["train"]] == quantity_sizes(100, shares, minimum=1)
    assert [len(p) for p in parts["test"]] == quantity_sizes(20, shares, minimum=1)
    assert flat(parts["train"]) == list(range(100)) and flat(parts["test"]) == list(range(20))
    assert min(len(p) for p in parts["train"]) >= 1
    # the biggest client is the same in train and test (one draw for both)
    big = int(np.argmax(shares))
    assert max(range(3), key=lambda c: len(parts["train"][c])) == big
    assert parts == split_quantity({"train": 100, "test": 20}, 3, alpha=0.5, seed=7)


def test_quantity_alpha_sets_the_skew():
    def biggest_share(alpha: float) -> float:
        parts = split_quantity({"train": 1000}, 4, alpha=alpha, seed=3)["train"]
        return max(len(p) for p in parts) / 1000

    assert biggest_share(1000.0) < 0.30   # near 1/4 each
    assert biggest_share(0.05) > 0.80     # one client holds most
