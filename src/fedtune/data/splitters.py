"""Pure, seeded ways to spread example indices over clients (iid, dirichlet, meta, quantity) and into splits.

`split_dirichlet`, `split_meta` and `split_quantity` take the labels (or sizes) of every part
(train, val, test) at once and draw ONE map for all of them, so a client's share of a label (or
of the data) is the same in each part.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NoReturn

import numpy as np

from fedtune.errors import DataError
from fedtune.seeding import derive_seed

Parts = dict[str, list[list[int]]]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed % 2**64)


def _check_clients(n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1, got {n_clients}")


def _groups(labels: Sequence[object]) -> dict[object, list[int]]:
    """Label -> indices, labels in a deterministic order (None first, then sorted)."""
    groups: dict[object, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return dict(sorted(groups.items(), key=lambda item: (item[0] is not None, str(item[0]))))


def require_categories(labels: Sequence[str | None], method: str, by: str = "category") -> None:
    """Raise a DataError when some example has no label (dirichlet and meta need one)."""
    missing = sum(label is None for label in labels)
    if not missing:
        return
    if by == "category":
        raise DataError(
            f"data.split.method '{method}' needs a category on every example, but {missing} of "
            f"{len(labels)} have none (the data has no category column); use "
            "`data.split.method: iid`, or map a category column with `data.fields.category`, "
            "or split by another column with `data.split.by`"
        )
    raise DataError(
        f"data.split.method '{method}' splits by column {by!r} (data.split.by), but {missing} of "
        f"{len(labels)} examples have no value there (missing or null); fill it in, or choose "
        "another data.split.by"
    )


def split_iid(n: int, n_clients: int, seed: int) -> list[list[int]]:
    """Shuffle 0..n-1 and deal it into `n_clients` parts whose sizes differ by at most one."""
    _check_clients(n_clients)
    order = _rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(order, n_clients)]


def dirichlet_proportions(
    label_names: Sequence[str], n_clients: int, alpha: float, seed: int
) -> dict[str, np.ndarray]:
    """For each label (in sorted order), client shares drawn from Dirichlet(alpha, ..., alpha)."""
    _check_clients(n_clients)
    if alpha <= 0:
        raise DataError(f"data.split.alpha must be positive, got {alpha}")
    rng = _rng(seed)
    proportions = {}
    for name in sorted(set(label_names)):
        shares = rng.dirichlet([alpha] * n_clients)
        if not np.all(np.isfinite(shares)) or shares.sum() <= 0:
            # Tiny alphas can underflow; the limit is all of the label on one client.
            shares = np.zeros(n_clients)
            shares[rng.integers(n_clients)] = 1.0
        proportions[name] = shares / shares.sum()
    return proportions


def split_by_proportions(
    labels: Sequence[str], proportions: dict[str, np.ndarray], seed: int
) -> list[list[int]]:
    """Shuffle each label's indices and cut them by that label's client shares."""
    if not proportions:
        if labels:
            _unknown_label(labels[0])
        return []
    n_clients = len(next(iter(proportions.values())))
    rng = _rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for label, indices in _groups(labels).items():
        if label not in proportions:
            _unknown_label(label)
        shuffled = rng.permutation(indices)
        cuts = np.round(np.cumsum(proportions[label])[:-1] * len(indices)).astype(int)
        for client, chunk in enumerate(np.split(shuffled, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return [sorted(part) for part in parts]


def _unknown_label(label: object) -> NoReturn:
    raise DataError(
        f"category {label!r} has no client proportions (it was not seen when drawing them)"
    )


def split_dirichlet(
    labels: Mapping[str, Sequence[str | None]], n_clients: int, alpha: float, seed: int,
    *, by: str = "category",
) -> Parts:
    """Label-skewed split of every part: each label's examples spread over clients by one
    Dirichlet(alpha) draw of shares, the same shares in every part."""
    all_labels = [label for part in labels.values() for label in part]
    require_categories(all_labels, "dirichlet", by)
    proportions = dirichlet_proportions(all_labels, n_clients, alpha,
                                        derive_seed(seed, "data", "dirichlet"))
    return {part: split_by_proportions(part_labels, proportions,
                                       derive_seed(seed, "data", "dirichlet", part))
            for part, part_labels in labels.items()}


def quantity_sizes(n: int, shares: Sequence[float], minimum: int = 0) -> list[int]:
    """`n` split by `shares` (largest remainder; ties to the lower client), `minimum` each first."""
    k = len(shares)
    if n < minimum * k:
        minimum = 0
    rest = n - minimum * k
    quotas = [float(s) * rest for s in shares]
    sizes = [int(q) for q in quotas]
    order = sorted(range(k), key=lambda c: (-(quotas[c] - sizes[c]), c))
    for c in order[: rest - sum(sizes)]:
        sizes[c] += 1
    return [size + minimum for size in sizes]


def split_quantity(sizes: Mapping[str, int], n_clients: int, alpha: float, seed: int) -> Parts:
    """Quantity skew: clients get different numbers of examples, labels aside.

    One draw of client shares from Dirichlet(alpha, ..., alpha) sets every part's sizes (each
    client gets at least one example of a part when it has as many as there are clients); the
    examples of each part are shuffled and dealt out in those sizes. Large alpha: near-equal
    sizes; alpha 0.5: a few clients hold most of the data.
    """
    _check_clients(n_clients)
    shares = dirichlet_proportions(["all"], n_clients, alpha, derive_seed(seed, "data", "quantity"))["all"]
    out: Parts = {}
    for part, n in sizes.items():
        order = _rng(derive_seed(seed, "data", "quantity", part)).permutation(n)
        cuts = np.cumsum(quantity_sizes(n, shares, minimum=1))[:-1]
        out[part] = [sorted(int(i) for i in chunk) for chunk in np.split(order, cuts)]
    return out


def assign_categories(category_sizes: dict[str, int], n_clients: int, seed: int) -> dict[str, int]:
    """Whole categories to clients, largest first, each to the currently lightest client.

    Ties (equal sizes, equal loads) are broken by a seeded random order. Every client gets at
    least one category.
    """
    _check_clients(n_clients)
    if len(category_sizes) < n_clients:
        raise DataError(
            f"data.split.method 'meta' gives whole categories to clients, so it needs at least as "
            f"many categories as federation.clients: {len(category_sizes)} categories "
            f"({', '.join(sorted(category_sizes))}) for {n_clients} clients; use fewer clients "
            "or another data.split.method"
        )
    rng = _rng(seed)
    names = sorted(category_sizes)
    rank = dict(zip(names, rng.permutation(len(names)).tolist(), strict=True))
    priority = rng.permutation(n_clients).tolist()
    load = [0] * n_clients
    count = [0] * n_clients
    assignment: dict[str, int] = {}
    for name in sorted(names, key=lambda c: (-category_sizes[c], rank[c])):
        client = min(range(n_clients), key=lambda k: (load[k], count[k], priority[k]))
        assignment[name] = client
        load[client] += category_sizes[name]
        count[client] += 1
    return assignment


def split_by_assignment(
    categories: Sequence[str], assignment: dict[str, int], n_clients: int
) -> list[list[int]]:
    """Indices per client following a category -> client map."""
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for index, category in enumerate(categories):
        if category not in assignment:
            raise DataError(f"category {category!r} was not assigned to any client")
        parts[assignment[category]].append(index)
    return parts


def split_meta(
    labels: Mapping[str, Sequence[str | None]], n_clients: int, seed: int, *, by: str = "category"
) -> Parts:
    """Split every part by whole labels (one label -> client map), balancing examples per client."""
    all_labels = [label for part in labels.values() for label in part]
    require_categories(all_labels, "meta", by)
    assignment = assign_categories(dict(Counter(all_labels)), n_clients,
                                   derive_seed(seed, "data", "meta"))
    return {part: split_by_assignment(part_labels, assignment, n_clients)
            for part, part_labels in labels.items()}


def _allocate(
    counts: list[int], capacity: list[int], total: int, rng: np.random.Generator
) -> list[int]:
    """Spread `total` over groups in proportion to `counts` (largest remainder), within `capacity`."""
    grand = sum(counts)
    if grand == 0 or total == 0:
        return [0] * len(counts)
    quotas = [c * total / grand for c in counts]
    taken = [min(int(q), cap) for q, cap in zip(quotas, capacity, strict=True)]
    tiebreak = rng.random(len(counts))
    order = sorted(range(len(counts)), key=lambda g: (-(quotas[g] - int(quotas[g])), tiebreak[g]))
    remaining = total - sum(taken)
    while remaining > 0:
        progressed = False
        for g in order:
            if remaining > 0 and taken[g] < capacity[g]:
                taken[g] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return taken


def train_val_test_split(
    labels: Sequence[str | None], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Stratified by label (None is a label too): index lists for train, val and test."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"fractions must be >= 0 and sum below 1, got val={val_fraction}, test={test_fraction}"
        )
    rng = _rng(seed)
    groups = [rng.permutation(indices).tolist() for indices in _groups(labels).values()]
    counts = [len(g) for g in groups]
    n = len(labels)
    n_test = _allocate(counts, counts, round(n * test_fraction), rng)
    left = [c - t for c, t in zip(counts, n_test, strict=True)]
    n_val = _allocate(counts, left, round(n * val_fraction), rng)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for indices, t, v in zip(groups, n_test, n_val, strict=True):
        test.extend(indices[:t])
        val.extend(indices[t : t + v])
        train.extend(indices[t + v :])
    return sorted(train), sorted(val), sorted(test)
