"""FedEx's distribution θ over local configurations and its exponentiated-gradient update, as pure
functions in float64, with the state a run checkpoints (Khodak et al. 2021; docs/algorithms.md).

One round's feedback is, per client i that trained: the configuration c_i it drew, its loss L_i
(validation loss after local training, or after − before) and its weight w_i (the update's
weight). With w normalised and λ the baseline (a discounted mean of the rounds' weighted mean
losses, this round's included):  ĝ_j = Σ_i w_i (L_i − λ) 1[c_i = j] / θ_j,
θ ← θ ⊙ exp(−η_t ĝ), renormalised (in log space); η_t = η₀ / d_t by the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("auto", "adaptive", "aggressive", "constant")


@dataclass(frozen=True)
class Feedback:
    """One client's contribution to a round's update."""

    config: int
    loss: float
    weight: float


def entropy(theta: np.ndarray) -> float:
    """Shannon entropy of θ in nats (0·log 0 = 0)."""
    p = theta[theta > 0]
    return float(-(p * np.log(p)).sum())


def normalise_log(z: np.ndarray) -> np.ndarray:
    """z − logsumexp(z): log-probabilities that sum to one."""
    top = float(z.max())
    return z - (top + math.log(float(np.exp(z - top).sum())))


def gradient(theta: np.ndarray, feedback: Sequence[Feedback], baseline: float) -> np.ndarray:
    """ĝ_j = Σ_i w_i (L_i − λ) 1[c_i = j] / θ_j, the weights normalised to sum to one."""
    total = sum(f.weight for f in feedback)
    grad = np.zeros_like(theta)
    for f in feedback:
        grad[f.config] += (f.weight / total) * (f.loss - baseline) / theta[f.config]
    return grad


def weighted_mean(feedback: Sequence[Feedback]) -> float:
    total = sum(f.weight for f in feedback)
    return sum(f.weight * f.loss for f in feedback) / total


def step_size(eta0: float, schedule: str, t: int, grad: np.ndarray, store: float) -> tuple[float, float]:
    """(η_t, the schedule's new running store) for the t-th update (1-based): `auto` η₀/√t,
    `adaptive` η₀/√(Σ‖ĝ‖∞²), `aggressive` η₀/‖ĝ‖∞, `constant` η₀."""
    norm = float(np.abs(grad).max()) if grad.size else 0.0
    if schedule == "auto":
        return eta0 / math.sqrt(t), store
    if schedule == "adaptive":
        store += norm ** 2
        return (eta0 / math.sqrt(store) if store > 0 else eta0), store
    if schedule == "aggressive":
        return (eta0 / norm if norm > 0 else eta0), store
    if schedule == "constant":
        return eta0, store
    raise ValueError(f"unknown FedEx schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


class Policy:
    """θ (kept as log θ), the baseline's discounted sums, the schedule's store and the update count."""

    def __init__(self, n: int, eta0: float, schedule: str, discount: float, cutoff: float):
        self.log_theta = np.full(n, -math.log(n))
        self.eta0, self.schedule, self.discount, self.cutoff = eta0, schedule, discount, cutoff
        self.base_sum = 0.0      # Σ_k γ^(t−k) L̄_k
        self.base_weight = 0.0   # Σ_k γ^(t−k)
        self.store = 0.0
        self.updates = 0
        self.last_eta = 0.0
        self.last_baseline: float | None = None

    @property
    def theta(self) -> np.ndarray:
        return np.exp(self.log_theta)

    def exploring(self) -> bool:
        """False once θ's entropy has fallen below the cutoff: every client then takes argmax θ."""
        return entropy(self.theta) >= self.cutoff

    def best(self) -> int:
        return int(np.argmax(self.log_theta))

    def draw(self, seed: int) -> int:
        """A configuration for one client: sampled from θ by `seed`, or argmax θ once stopped."""
        if not self.exploring():
            return self.best()
        rng = np.random.default_rng(seed)
        return int(rng.choice(len(self.log_theta), p=self.theta / self.theta.sum()))

    def update(self, feedback: Sequence[Feedback]) -> None:
        """One round's exponentiated-gradient step (nothing without feedback or once stopped)."""
        if not feedback or sum(f.weight for f in feedback) <= 0:
            return
        self.base_sum = self.discount * self.base_sum + weighted_mean(feedback)
        self.base_weight = self.discount * self.base_weight + 1.0
        baseline = self.base_sum / self.base_weight
        self.last_baseline = baseline
        if not self.exploring():
            return
        theta = self.theta
        grad = gradient(theta, feedback, baseline)
        self.updates += 1
        eta, self.store = step_size(self.eta0, self.schedule, self.updates, grad, self.store)
        self.last_eta = eta
        self.log_theta = normalise_log(self.log_theta - eta * grad)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        scalars = [self.base_sum, self.base_weight, self.store, float(self.updates), self.last_eta,
                   math.nan if self.last_baseline is None else self.last_baseline]
        return {prefix + "log_theta": torch.tensor(self.log_theta, dtype=torch.float64),
                prefix + "scalars": torch.tensor(scalars, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        log_theta = state[prefix + "log_theta"].to(torch.float64).numpy().copy()
        scalars = state[prefix + "scalars"].to(torch.float64).tolist()
        if log_theta.shape != self.log_theta.shape or len(scalars) != 6:
            raise ValueError(f"FedEx state holds {log_theta.shape[0]} configurations, the recipe's "
                             f"grid {self.log_theta.shape[0]}")
        self.log_theta = log_theta
        self.base_sum, self.base_weight, self.store, updates, self.last_eta, baseline = scalars
        self.updates = int(updates)
        self.last_baseline = None if math.isnan(baseline) else baseline
