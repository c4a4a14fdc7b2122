"""What the runtime checks in a recipe: an engine the algorithm can run on, and a Ray address of a
usable form (registered with fedtune.config.checks; no torch, no ray)."""

from __future__ import annotations

from typing import Any

from fedtune.algorithms.catalog import CATALOG
from fedtune.config.checks import register_check


def engine(fed: Any) -> None:
    """`federation.engine: ray` only for algorithms whose clients can live in actors."""
    if fed.engine != "ray":
        return
    if fed.parallel_clients > 1:
        raise ValueError("parallel_clients trains clients together on the in-process engine's one "
                         "model; engine ray runs each actor's clients one after another (set "
                         "parallel_clients: 1, or use engine: inprocess)")
    info = CATALOG.get(fed.algorithm)
    if info is not None and info.no_ray is not None:
        raise ValueError(f"engine ray cannot host {fed.algorithm}'s clients: {info.no_ray}; "
                         "use engine: inprocess")
    address = fed.ray.address
    if address is not None and address != "auto" and (
            ":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"ray.address {address!r} must be host:port (a running `ray start "
                         "--head`) or auto; leave it unset for a local Ray")


register_check("federation", engine)
