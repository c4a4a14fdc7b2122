"""What `fedtune bench` runs: local-only, federated and centralised variants of one recipe, on ONE
split and one budget (docs/bench.md, "The budget rule").

Every variant is an ordinary recipe plus a prebuilt FederatedData cut from the bench's split, so it
runs through the same Simulation as `fedtune run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtune.config import Recipe, load_recipe
from fedtune.data.federated import ClientData, FederatedData

LOCAL, FEDERATED, CENTRALISED, LOCAL_MEAN = "local-only", "federated", "centralised", "local-only mean"
POOLED = "pooled"  # the one client of the centralised run


@dataclass
class Variant:
    """One run of the bench: its name (also its directory), kind, recipe and data."""

    name: str
    kind: str
    recipe: Recipe
    data: FederatedData
    trained_on: list[str]            # the bench clients whose training data this run uses
    budget: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        on = ", ".join(self.trained_on)
        if self.kind == LOCAL:
            return f"local-only: {on} alone"
        if self.kind == CENTRALISED:
            return f"centralised: pooled data of {on}"
        return f"federated: {self.name} over {on}"


def budget_rule(recipe: Recipe) -> dict[str, Any]:
    """The per-variant budget, in words and numbers (the same rounds and lr schedule for all).

    Federated: R rounds; a client taking part trains `local` per round. Local-only: the client
    trains `local` every round. Centralised: `centralised` per round on the pooled data, i.e. the
    optimizer steps (and examples) of all clients taking part in a round, so the same total as the
    whole federation.
    """
    fed, train = recipe.federation, recipe.train
    per_round = fed.per_round()
    if train.local_steps is not None:
        local = {"local_steps": train.local_steps}
        central = {"local_steps": train.local_steps * per_round}
        words = (f"{fed.rounds} rounds; each client trains {train.local_steps} steps of batch "
                 f"{train.batch_size} per round it takes part in ({per_round} of {fed.clients} per "
                 f"round); local-only: {train.local_steps} steps every round; centralised: "
                 f"{train.local_steps * per_round} steps per round on the pooled data "
                 f"({fed.rounds * train.local_steps * per_round} in all, the federation's total)")
    else:
        epochs = train.local_epochs * per_round / fed.clients
        local = {"local_epochs": train.local_epochs}
        central = {"local_epochs": epochs}
        words = (f"{fed.rounds} rounds; each client trains {train.local_epochs:g} epoch(s) of its "
                 f"data per round it takes part in ({per_round} of {fed.clients} per round); "
                 f"local-only: the same every round; centralised: {epochs:g} epoch(s) of the pooled "
                 "data per round (the examples of all clients taking part)")
    return {"rounds": fed.rounds, "batch_size": train.batch_size, "clients_per_round": per_round,
            "local": local, "centralised": central, "rule": words}


def _baseline_recipe(recipe: Recipe, name: str, train: dict[str, Any]) -> Recipe:
    """A one-client recipe: plain local training (fedavg of one client is its own update), no
    codec, no attack, no secure aggregation (nothing travels), no client-side evaluation (the
    bench evaluates every client's test part)."""
    d = recipe.model_dump(mode="json")
    d["federation"].update(algorithm="fedavg", options={}, clients=1, clients_per_round=None,
                           sample_fraction=None, compression={}, attack={}, secure_aggregation={},
                           holdout_clients=0)
    d["train"].update({"local_steps": None, "local_epochs": None, **train})
    d["transport"]["min_replies"] = 1
    d["eval"]["clients"] = False
    d["output"]["name"] = name
    return load_recipe(d)


def plan_variants(recipe: Recipe, data: FederatedData) -> list[Variant]:
    """Local-only per client, then the federated algorithms, then centralised, as the recipe's
    `bench` section asks. Each variant's `output.name` is its name (its directory in the bench's)."""
    budget = budget_rule(recipe)
    variants: list[Variant] = []
    if recipe.bench.local_only:
        for name, part in data.clients.items():
            variants.append(Variant(
                f"local-{name}", LOCAL,
                _baseline_recipe(recipe, f"local-{name}", budget["local"]),
                FederatedData(clients={name: part}, test=data.test), [name], budget["local"]))
    algorithms = recipe.bench.algorithms
    entries = ([(a.variant, a.name, a.options, a.adapter) for a in algorithms] if algorithms is not None
               else [(recipe.federation.algorithm, recipe.federation.algorithm, recipe.federation.options, {})])
    for label, algorithm, options, adapter in entries:
        d = recipe.model_dump(mode="json")
        d["federation"].update(algorithm=algorithm, options=options)
        d["adapter"].update(adapter)   # the variant's own adapter keys (heterogeneous ranks)
        d["output"]["name"] = label
        variants.append(Variant(label, FEDERATED, load_recipe(d), data, list(data.clients),
                                budget["local"]))
    if recipe.bench.centralised:
        pooled = ClientData(
            POOLED,
            train=[ex for c in data.clients.values() for ex in c.train],
            val=[ex for c in data.clients.values() for ex in c.val],
            test=data.test,
        )
        variants.append(Variant(
            "centralised", CENTRALISED,
            _baseline_recipe(recipe, "centralised", budget["centralised"]),
            FederatedData(clients={POOLED: pooled}, test=data.test), list(data.clients),
            budget["centralised"]))
    return variants
