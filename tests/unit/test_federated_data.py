"""build_federated_data: loading, held-out splits, consistent client assignment, summaries."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter

import pytest
from rich.console import Console

from fedtune.config import DataSection
from fedtune.data.examples import Example
from fedtune.data.federated import (
    ClientData,
    FederatedData,
    build_federated_data,
    client_names,
    format_split_table,
)
from fedtune.errors import DataError

SIZES = {"add": 60, "reverse": 50, "upper": 40, "sort": 30, "max": 20}


def _rows() -> list[dict]:
    return [
        {"instruction": f"{cat} task {i}", "output": f"{cat} answer {i}", "category": cat}
        for cat, n in SIZES.items()
        for i in range(n)
    ]


@pytest.fixture
def source(tmp_path) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return str(path)


def section(source: str, **kwargs) -> DataSection:
    split = kwargs.pop("split", {})
    return DataSection(
        source=source,
        format="custom",
        fields={"instruction": "instruction", "output": "output", "category": "category"},
        split=split,
        **kwargs,
    )


def all_parts(data: FederatedData) -> list[Example]:
    return [ex for c in data.clients.values() for ex in (*c.train, *c.val, *c.test)]


def test_client_names():
    assert client_names(3) == ["client_0", "client_1", "client_2"]


def test_iid_every_example_once_and_sizes(source):
    data = build_federated_data(section(source, val_fraction=0.1, test_fraction=0.2), 3, seed=0)
    assert list(data.clients) == ["client_0", "client_1", "client_2"]
    origins = [ex.origin for ex in all_parts(data)]
    assert len(origins) == len(set(origins)) == 200
    summary = data.summary()
    assert summary["totals"] == {"n_train": 140, "n_val": 20, "n_test": 40}
    assert summary["global_test"] == 40
    assert sorted(c["n_train"] for c in summary["clients"].values()) == [46, 47, 47]
    assert data.test == [ex for c in data.clients.values() for ex in c.test]
    again = build_federated_data(section(source, val_fraction=0.1, test_fraction=0.2), 3, seed=0)
    assert again == data


def test_meta_categories_disjoint_and_consistent_across_splits(source):
    data = build_federated_data(section(source, split={"method": "meta"}), 3, seed=4)
    seen: dict[str, str] = {}
    for name, client in data.clients.items():
        for part in (client.train, client.val, client.test):
            for ex in part:
                assert seen.setdefault(ex.category, name) == name  # one client per category
        # a client's categories are the same in train, val and test
        cats = {
            part: {ex.category for ex in getattr(client, part)} for part in ("train", "val", "test")
        }
        assert cats["train"] == cats["val"] == cats["test"]
    # balanced greedy: add=60 | reverse=50 | upper=40, then sort=30 -> upper, max=20 -> reverse
    loads = sorted(sum(data.clients[n].categories().values()) for n in data.clients)
    assert loads == [60, 70, 70]


def test_meta_with_more_clients_than_categories(source):
    with pytest.raises(DataError, match="federation.clients"):
        build_federated_data(section(source, split={"method": "meta"}), 6, seed=0)


def test_dirichlet_same_proportions_on_every_split(source):
    data = build_federated_data(
        section(
            source, split={"method": "dirichlet", "alpha": 0.3}, val_fraction=0.2, test_fraction=0.2
        ),
        3,
        seed=2,
    )
    assert len({ex.origin for ex in all_parts(data)}) == 200
    # per category, a client's share of train and of test agree (same proportions, rounding aside)
    for client in data.clients.values():
        train, test = (
            Counter(e.category for e in client.train),
            Counter(e.category for e in client.test),
        )
        for cat, n in SIZES.items():
            n_train, n_test = round(n * 0.6), round(n * 0.2)
            assert abs(train[cat] / n_train - test[cat] / n_test) <= 1.5 / n_test + 1e-9


def test_dirichlet_without_categories_explains(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(20))
    )
    with pytest.raises(DataError, match="no category column"):
        build_federated_data(
            DataSection(source=str(path), split={"method": "dirichlet"}), 2, seed=0
        )


def test_client_without_training_data(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(4))
    )
    with pytest.raises(
        DataError, match="client_4 has no training examples.*fewer federation.clients"
    ):
        build_federated_data(
            DataSection(source=str(path), val_fraction=0, test_fraction=0), 5, seed=0
        )


def test_test_source_used_as_test_split(source, tmp_path):
    test_path = tmp_path / "test.jsonl"
    test_path.write_text(
        "".join(
            json.dumps({"instruction": f"t{i}", "output": "o", "category": "add"}) + "\n"
            for i in range(9)
        )
    )
    data = build_federated_data(
        section(source, test_source=str(test_path), val_fraction=0.1, test_fraction=0.3), 3, seed=0
    )
    summary = data.summary()
    assert summary["totals"] == {"n_train": 180, "n_val": 20, "n_test": 9}
    assert sorted(ex.instruction for ex in data.test) == sorted(f"t{i}" for i in range(9))


def test_synthetic_source_with_max_examples(monkeypatch):
    calls = []

    def generate_examples(synthetic, seed):
        calls.append(seed)
        return [
            Example(instruction=f"{c} {i}", output="x", category=c, origin=f"synthetic:{c}:{i}")
            for c in ("add", "reverse")
            for i in range(50)
        ]

    fake = types.ModuleType("fedtune.data.synthetic")
    fake.generate_examples = generate_examples
    monkeypatch.setitem(sys.modules, "fedtune.data.synthetic", fake)
    data = build_federated_data(
        DataSection(source="synthetic", max_examples=40, val_fraction=0, test_fraction=0.25),
        2,
        seed=9,
    )
    assert calls == [9]
    assert data.summary()["totals"] == {"n_train": 30, "n_val": 0, "n_test": 10}
    assert {ex.category for ex in all_parts(data)} == {"add", "reverse"}  # a shuffled subset


def test_split_table_renders_totals():
    data = FederatedData(
        clients={
            "client_0": ClientData(
                "client_0",
                train=[Example("a", "b", category="add")] * 3,
                val=[],
                test=[Example("a", "b", category="reverse")],
            ),
        },
        test=[],
    )
    assert data.clients["client_0"].categories() == {"add": 3, "reverse": 1}
    console = Console(width=120, record=True)
    console.print(format_split_table(data))
    text = console.export_text()
    assert "add:3, reverse:1" in text
    assert "total" in text and "2 categories" in text


def test_split_by_any_column_groups_by_its_values(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "a", "user": ["ann", "bob", "cy", "dee"][i % 4],
             "level": i % 2} for i in range(40)]
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_federated_data(
        DataSection(source=str(path), split={"method": "meta", "by": "user"}, val_fraction=0,
                    test_fraction=0), 2, seed=0)
    users = [{rows[int(ex.origin.rsplit(":", 1)[1]) - 1]["user"] for ex in c.train}
             for c in data.clients.values()]
    assert sorted(len(u) for u in users) == [2, 2] and not users[0] & users[1]
    # a numeric column works too (its values are compared as text)
    data = build_federated_data(
        DataSection(source=str(path), split={"method": "meta", "by": "level"}, val_fraction=0,
                    test_fraction=0), 2, seed=0)
    assert sorted({ex.split_value for ex in c.train} for c in data.clients.values()) == [{"0"}, {"1"}]


def test_split_by_a_missing_column_names_it(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(20)))
    with pytest.raises(DataError, match="column 'user' \\(data.split.by\\)"):
        build_federated_data(DataSection(source=str(path), split={"method": "dirichlet", "by": "user"}),
                             2, seed=0)
    with pytest.raises(DataError, match="synthetic benchmark has only"):
        build_federated_data(DataSection(split={"method": "meta", "by": "user"}), 2, seed=0)


def test_quantity_skew_gives_clients_different_sizes(source):
    data = build_federated_data(section(source, split={"method": "quantity", "alpha": 0.3},
                                        val_fraction=0, test_fraction=0), 4, seed=1)
    sizes = [len(c.train) for c in data.clients.values()]
    assert sum(sizes) == 200 and min(sizes) >= 1 and max(sizes) > 2 * min(sizes)
    assert len({ex.origin for ex in all_parts(data)}) == 200
