"""The federated dataset: examples loaded, split into train/val/test and spread over clients."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.table import Table

from fedtune.config import DataSection
from fedtune.data.examples import Example
from fedtune.data.records import load_examples
from fedtune.data.splitters import (
    split_dirichlet,
    split_iid,
    split_meta,
    split_quantity,
    train_val_test_split,
)
from fedtune.errors import DataError
from fedtune.seeding import derive_seed

PARTS = ("train", "val", "test")


def client_names(n: int) -> list[str]:
    """`client_0`, `client_1`, ... (the names used in messages, metrics and reports)."""
    return [f"client_{i}" for i in range(n)]


@dataclass
class ClientData:
    """One client's examples."""

    name: str
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def categories(self) -> dict[str, int]:
        """Category -> number of examples over train, val and test (uncategorised ones left out)."""
        counts = Counter(ex.category for ex in (*self.train, *self.val, *self.test))
        counts.pop(None, None)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


@dataclass
class FederatedData:
    """All clients' data, plus the global test set (every client's test part, client by client)."""

    clients: dict[str, ClientData]
    test: list[Example]

    def summary(self) -> dict[str, Any]:
        per_client = {
            name: {
                "n_train": len(c.train),
                "n_val": len(c.val),
                "n_test": len(c.test),
                "categories": c.categories(),
            }
            for name, c in self.clients.items()
        }
        totals = {
            f"n_{part}": sum(len(getattr(c, part)) for c in self.clients.values()) for part in PARTS
        }
        return {"clients": per_client, "totals": totals, "global_test": len(self.test)}


def _load_source(section: DataSection, seed: int) -> list[Example]:
    by = None if section.split.by == "category" else section.split.by
    if section.source == "synthetic" and by is not None:
        raise DataError(f"data.split.by {by!r}: the synthetic benchmark has only the `category` "
                        "column to split by")
    if section.source == "synthetic":
        from fedtune.data.synthetic import generate_examples

        examples = list(generate_examples(section.synthetic, seed))
        if section.max_examples is not None and len(examples) > section.max_examples:
            rng = np.random.default_rng(derive_seed(seed, "data", "subsample"))
            keep = sorted(rng.permutation(len(examples))[: section.max_examples].tolist())
            examples = [examples[i] for i in keep]
        return examples
    return load_examples(
        section.source, format=section.format, fields=section.fields, limit=section.max_examples,
        split_by=by,
    )


def _split_parts(section: DataSection, seed: int) -> dict[str, list[Example]]:
    examples = _load_source(section, seed)
    labels = [ex.category for ex in examples]
    if section.test_source is not None:
        by = None if section.split.by == "category" else section.split.by
        test = load_examples(section.test_source, format=section.format, fields=section.fields,
                             split_by=by)
        train_idx, val_idx, _ = train_val_test_split(
            labels, section.val_fraction, 0.0, derive_seed(seed, "data", "holdout")
        )
    else:
        train_idx, val_idx, test_idx = train_val_test_split(
            labels,
            section.val_fraction,
            section.test_fraction,
            derive_seed(seed, "data", "holdout"),
        )
        test = [examples[i] for i in test_idx]
    return {
        "train": [examples[i] for i in train_idx],
        "val": [examples[i] for i in val_idx],
        "test": test,
    }


def _client_indices(
    parts: dict[str, list[Example]], section: DataSection, n_clients: int, seed: int
) -> dict[str, list[list[int]]]:
    """Part -> per-client index lists, with ONE proportion/category map shared by all parts."""
    split = section.split
    if split.method == "iid":
        return {
            part: split_iid(len(exs), n_clients, derive_seed(seed, "data", "iid", part))
            for part, exs in parts.items()
        }
    if split.method == "quantity":
        return split_quantity({part: len(exs) for part, exs in parts.items()}, n_clients,
                              split.alpha, seed)
    labels = {part: [split_label(ex, split.by) for ex in parts[part]] for part in PARTS}
    if split.method == "dirichlet":
        return split_dirichlet(labels, n_clients, split.alpha, seed, by=split.by)
    if split.method == "meta":
        return split_meta(labels, n_clients, seed, by=split.by)
    raise DataError(f"unknown data.split.method {split.method!r}; allowed: iid, dirichlet, meta, quantity")


def split_label(example: Example, by: str) -> str | None:
    """The label `data.split.by` names: the example's category, or its value of that column."""
    return example.category if by == "category" else example.split_value


def build_federated_data(section: DataSection, n_clients: int, seed: int) -> FederatedData:
    """Load the data of `section` and give each of `n_clients` clients its train/val/test parts."""
    parts = _split_parts(section, seed)
    indices = _client_indices(parts, section, n_clients, seed)
    clients: dict[str, ClientData] = {}
    for k, name in enumerate(client_names(n_clients)):
        chosen = {part: [parts[part][i] for i in indices[part][k]] for part in PARTS}
        clients[name] = ClientData(name=name, **chosen)
    for name, client in clients.items():
        if not client.train:
            hint = (" or a larger data.split.alpha"
                    if section.split.method in ("dirichlet", "quantity") else "")
            raise DataError(
                f"{name} has no training examples ({len(parts['train'])} training examples over "
                f"{n_clients} clients, data.split.method '{section.split.method}'); "
                f"use fewer federation.clients{hint}"
            )
    test = [ex for client in clients.values() for ex in client.test]
    return FederatedData(clients=clients, test=test)


def _category_text(categories: dict[str, int], limit: int = 6) -> str:
    if not categories:
        return "-"
    items = list(categories.items())
    text = ", ".join(f"{name}:{count}" for name, count in items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit} more"
    return text


def format_split_table(data: FederatedData, max_rows: int = 20) -> Table:
    """A rich table: one row per client (sizes and categories; the first `max_rows`) and a total row."""
    table = Table(title="Data split")
    table.add_column("client")
    for part in PARTS:
        table.add_column(part, justify="right")
    table.add_column("categories")
    for name, client in list(data.clients.items())[:max_rows]:
        sizes = [str(len(getattr(client, part))) for part in PARTS]
        table.add_row(name, *sizes, _category_text(client.categories()))
    if len(data.clients) > max_rows:
        table.add_row(f"... {len(data.clients) - max_rows} more", "", "", "", "(all in split.json)")
    totals = Counter[str]()
    for client in data.clients.values():
        totals.update(client.categories())
    table.add_row(
        "total",
        *(str(sum(len(getattr(c, part)) for c in data.clients.values())) for part in PARTS),
        f"{len(totals)} categories" if totals else "-",
        style="bold",
    )
    return table
