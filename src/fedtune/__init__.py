"""fedtune: federated fine-tuning of large language models.

    import fedtune
    summary = fedtune.run("default", ["federation.rounds=5"])
    result = fedtune.bench("default", ["federation.rounds=5"])   # local-only, FedAvg, centralised
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "bench", "load_recipe", "run"]


def __getattr__(name: str):
    # Lazy: `import fedtune` stays fast; torch and transformers load on first use.
    if name == "run":
        from fedtune.runtime.simulation import run

        return run
    if name == "bench":
        from fedtune.baselines.runner import bench

        return bench
    if name == "load_recipe":
        from fedtune.config import load_recipe

        return load_recipe
    raise AttributeError(f"module 'fedtune' has no attribute {name!r}")
