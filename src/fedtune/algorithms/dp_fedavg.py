"""DP-FedAvg (McMahan et al. 2018): client-level differential privacy for the federation.

Each client's update is clipped to L2 norm C; the server averages the clipped updates of the m
clients of the round (uniformly: example counts would leak and are unbounded) and adds Gaussian
noise N(0, (z·C/m)²) to every coordinate. The privacy spent, (ε, δ), is computed by Google's
`dp-accounting` RDP accountant for Poisson-subsampled Gaussian mechanisms with sampling rate
q = m / N per round (fixed-size sampling is accounted as Poisson, the usual approximation), and
reported after every round and in the summary.

Noise comes from the OS's secure randomness unless `noise_seed` is set, which makes runs (and
resumes) reproducible for experiments — but anyone who knows the seed can remove the noise.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import torch

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.folding import WeightedSum, fold_all
from fedtune.algorithms.options import DPFedAvgConfig
from fedtune.seeding import derive_seed


def update_norm(update: State) -> float:
    return float(sum(float((t.double() ** 2).sum()) for t in update.values())) ** 0.5


def clip_update(update: State, clip_norm: float) -> tuple[State, float]:
    """The update scaled by min(1, C/‖Δ‖) (global L2 norm over all its tensors), and ‖Δ‖."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.float() * scale for k, v in update.items()}, norm


def dp_fedavg_aggregate(global_state: State, updates: list[State], *, clip_norm: float,
                        noise_multiplier: float, generator: torch.Generator) -> State:
    """global + mean_i clip(Δ_i) + N(0, (z·C/m)²)."""
    m = len(updates)
    clipped = [clip_update(u, clip_norm)[0] for u in updates]
    std = noise_multiplier * clip_norm / m
    out = {}
    for name, g in global_state.items():
        mean = sum(c[name] for c in clipped) / m
        noise = torch.randn(g.shape, generator=generator, dtype=torch.float32) * std
        out[name] = (g.float() + mean + noise).to(g.dtype)
    return out


def dp_epsilon(noise_multiplier: float, sampling_rates: list[float], delta: float) -> float:
    """ε after one Poisson-subsampled Gaussian mechanism per round (RDP accountant)."""
    if not sampling_rates:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    import dp_accounting
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # the accountant's convergence notes
    accountant = rdp.RdpAccountant()
    for q in sampling_rates:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(noise_multiplier)))
    return float(accountant.get_epsilon(delta))


class _DPFold:
    """A DP-FedAvg round streamed: each update clipped as it arrives and added to the running
    sum; at the end their mean plus the Gaussian noise (dp_fedavg_aggregate's arithmetic)."""

    def __init__(self, strategy: DPFedAvg, global_state: State, generator: torch.Generator):
        self.strategy, self.global_state, self.generator = strategy, global_state, generator
        self.running = WeightedSum({k: v.float() for k, v in global_state.items()})
        self.clipped = 0

    def add(self, update: ClientUpdate) -> None:
        clipped, norm = clip_update(update.tensors, self.strategy.config.clip_norm)
        self.clipped += norm > self.strategy.config.clip_norm
        self.running.add(clipped, 1.0)

    def finish(self) -> State:
        c, m = self.strategy.config, self.running.count
        if m == 0:
            raise ValueError("dp_fedavg_aggregate needs at least one update")
        self.strategy.clipped_fraction = self.clipped / m
        self.strategy.rates.append(m / self.strategy.n_clients)
        std = c.noise_multiplier * c.clip_norm / m
        mean = self.running.mean()
        out = {}
        for name, g in self.global_state.items():
            noise = torch.randn(g.shape, generator=self.generator, dtype=torch.float32) * std
            out[name] = (g.float() + mean[name] + noise).to(g.dtype)
        return out


@plain
class DPFedAvg:
    def __init__(self, config: DPFedAvgConfig, n_clients: int):
        self.config = config
        self.n_clients = n_clients
        self.rates: list[float] = []
        self.clipped_fraction = 0.0

    def fold(self, round_: int, global_state: State) -> _DPFold:
        c = self.config
        seed = (derive_seed(c.noise_seed, "dp-noise", round_) if c.noise_seed is not None
                else secrets.randbits(63))
        return _DPFold(self, global_state, torch.Generator().manual_seed(seed))

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        return fold_all(self.fold(round_, global_state), updates)

    def round_metrics(self) -> dict[str, Any]:
        eps = dp_epsilon(self.config.noise_multiplier, self.rates, self.config.delta)
        return {"epsilon": eps if eps != float("inf") else None, "delta": self.config.delta,
                "clipped_fraction": self.clipped_fraction}

    def state_dict(self) -> State:
        return {"dp/rates": torch.tensor(self.rates, dtype=torch.float64)}

    def load_state_dict(self, state: State) -> None:
        self.rates = state["dp/rates"].tolist() if "dp/rates" in state else []


SPEC = register("dp_fedavg", DPFedAvg, needs_clients=True)
