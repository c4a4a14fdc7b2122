"""Offsite-tuning (FederatedScope-LLM's): clients tune the first and last layers of an emulator, a
layer-dropped copy of the model the owner keeps; FedAvg of those layers; the server plugs them back
into the full model by depth. The emulator is built by the server process (runtime/setup.py with
models/offsite.py); this module holds the server side, which is FedAvg (options: options.py).
"""

from __future__ import annotations

from fedtune.algorithms.base import register
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig

SPEC = register("offsite", lambda config, n_clients: FedAvg(FedAvgConfig(weighting=config.weighting)))
