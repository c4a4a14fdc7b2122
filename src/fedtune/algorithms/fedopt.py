"""Server optimizers over the clients' mean update: FedAvgM, FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from fedtune.algorithms.base import ClientUpdate, State, plain, register
from fedtune.algorithms.fedavg import fedavg_aggregate, update_weight
from fedtune.algorithms.folding import WeightedSum, fold_all
from fedtune.algorithms.options import FedAvgMConfig

# The round's pseudo-gradient Δ is the weighted mean of the client updates (local − global),
# so it points *towards* the clients: every rule below moves the global state by +step.
# Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2 (no bias correction);
# FedAvgM from Hsu et al. 2019. Optimizer state lives in float32 (float64 for float64 tensors).

def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _slot(slots: State, name: str, like: torch.Tensor, fill: float) -> torch.Tensor:
    """The optimizer state for `name`, or a fresh one filled with `fill` (first round)."""
    if name in slots:
        return slots[name].to(_acc_dtype(like))
    return torch.full(like.shape, fill, dtype=_acc_dtype(like))


def pseudo_gradient(global_state: State, updates: Sequence[tuple[State, float]]) -> State:
    """Δ = Σ w_i Δ_i / Σ w_i, in float32 (float64 for float64 tensors)."""
    zeros = {n: torch.zeros(g.shape, dtype=_acc_dtype(g)) for n, g in global_state.items()}
    return fedavg_aggregate(zeros, updates)


def fedavgm_step(
    global_state: State, delta: State, v: State, *, lr: float, momentum: float
) -> tuple[State, State]:
    """v ← β v + Δ ; x ← x + η v. With η = 1 and β = 0 this is exactly FedAvg."""
    new_state, new_v = {}, {}
    for name, g in global_state.items():
        d = delta[name].to(_acc_dtype(g))
        new_v[name] = momentum * _slot(v, name, g, 0.0) + d
        new_state[name] = (g.to(d.dtype) + lr * new_v[name]).to(g.dtype)
    return new_state, new_v


def _adaptive_step(
    global_state: State, delta: State, m: State, v: State, *, lr: float, beta1: float,
    tau: float, v_init: float, second_moment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[State, State, State]:
    """m ← β1 m + (1−β1) Δ ; v ← second_moment(v, Δ²) ; x ← x + η m / (√v + τ)."""
    new_state, new_m, new_v = {}, {}, {}
    for name, g in global_state.items():
        d = delta[name].to(_acc_dtype(g))
        new_m[name] = beta1 * _slot(m, name, g, 0.0) + (1 - beta1) * d
        new_v[name] = second_moment(_slot(v, name, g, v_init), d * d)
        step = lr * new_m[name] / (new_v[name].sqrt() + tau)
        new_state[name] = (g.to(d.dtype) + step).to(g.dtype)
    return new_state, new_m, new_v


def fedadam_step(
    global_state: State, delta: State, m: State, v: State, *,
    lr: float, beta1: float, beta2: float, tau: float,
) -> tuple[State, State, State]:
    """Adam on the server: v ← β2 v + (1−β2) Δ²; m and v start at 0."""
    return _adaptive_step(
        global_state, delta, m, v, lr=lr, beta1=beta1, tau=tau, v_init=0.0,
        second_moment=lambda vv, d2: beta2 * vv + (1 - beta2) * d2,
    )


def fedyogi_step(
    global_state: State, delta: State, m: State, v: State, *,
    lr: float, beta1: float, beta2: float, tau: float,
) -> tuple[State, State, State]:
    """Yogi on the server: v ← v − (1−β2) Δ² sign(v − Δ²); v starts at τ² (the paper's v_{-1})."""
    return _adaptive_step(
        global_state, delta, m, v, lr=lr, beta1=beta1, tau=tau, v_init=tau * tau,
        second_moment=lambda vv, d2: vv - (1 - beta2) * d2 * torch.sign(vv - d2),
    )


def fedadagrad_step(
    global_state: State, delta: State, m: State, v: State, *, lr: float, beta1: float, tau: float,
) -> tuple[State, State, State]:
    """Adagrad with momentum, as the paper's Algorithm 2: v ← v + Δ²; beta1 = 0 gives plain Adagrad."""
    return _adaptive_step(
        global_state, delta, m, v, lr=lr, beta1=beta1, tau=tau, v_init=0.0,
        second_moment=lambda vv, d2: vv + d2,
    )


class _OptimizerFold:
    """A FedOpt round streamed: the running weighted sum of the updates, whose mean is the
    pseudo-gradient of the server's step at the end."""

    def __init__(self, optimizer: ServerOptimizer, global_state: State):
        self.optimizer, self.global_state = optimizer, global_state
        self.running = WeightedSum(global_state)

    def add(self, update: ClientUpdate) -> None:
        self.running.add(update.tensors, update_weight(update, self.optimizer.config.weighting))

    def finish(self) -> State:
        return self.optimizer.step(self.global_state, self.running.mean())


# A rule's step: (global, Δ, slots by kind) -> (new global, new slots by kind).
StepFn = Callable[[State, State, dict[str, State]], tuple[State, dict[str, State]]]


@plain
class ServerOptimizer:
    """A FedOpt strategy: the clients' mean update is a pseudo-gradient for a server-side step.

    Keeps one tensor per parameter name and slot ("m", "v"); `state_dict` names them
    `m/<name>`, `v/<name>` so a checkpoint restores them exactly.
    """

    def __init__(self, config: Any, slots: tuple[str, ...], step: StepFn):
        self.config = config
        self._step = step
        self.slots: dict[str, State] = {kind: {} for kind in slots}

    def fold(self, round_: int, global_state: State) -> _OptimizerFold:
        return _OptimizerFold(self, global_state)

    def aggregate_fit(self, round_: int, global_state: State, updates: list[ClientUpdate]) -> State:
        if not updates:
            raise ValueError("fedavg_aggregate needs at least one update")
        return fold_all(self.fold(round_, global_state), updates)

    def step(self, global_state: State, delta: State) -> State:
        """The server optimizer's step on the round's pseudo-gradient (updates its slots)."""
        new_state, self.slots = self._step(global_state, delta, self.slots)
        return new_state

    def state_dict(self) -> State:
        return {f"{kind}/{name}": t for kind, ts in self.slots.items() for name, t in ts.items()}

    def load_state_dict(self, state: State) -> None:
        slots: dict[str, State] = {kind: {} for kind in self.slots}
        for key, tensor in state.items():
            kind, sep, name = key.partition("/")
            if not sep or kind not in slots:
                raise ValueError(f"unexpected server optimizer state {key!r}; "
                                 f"expected keys like {'/<name>, '.join(slots)}/<name>")
            slots[kind][name] = tensor.clone()
        self.slots = slots


def _build_fedavgm(c: FedAvgMConfig) -> ServerOptimizer:
    def step(g: State, d: State, s: dict[str, State]) -> tuple[State, dict[str, State]]:
        new, v = fedavgm_step(g, d, s["v"], lr=c.server_lr, momentum=c.momentum)
        return new, {"v": v}

    return ServerOptimizer(c, ("v",), step)


def _build_adaptive(
    rule: Callable[..., tuple[State, State, State]], c: Any
) -> ServerOptimizer:
    """The strategy of an adaptive rule (bound with functools.partial when registered)."""
    hyper = c.model_dump(exclude={"server_lr", "weighting"})

    def step(g: State, d: State, s: dict[str, State]) -> tuple[State, dict[str, State]]:
        new, m, v = rule(g, d, s["m"], s["v"], lr=c.server_lr, **hyper)
        return new, {"m": m, "v": v}

    return ServerOptimizer(c, ("m", "v"), step)


FEDAVGM = register("fedavgm", _build_fedavgm)
FEDADAM = register("fedadam", partial(_build_adaptive, fedadam_step))
FEDYOGI = register("fedyogi", partial(_build_adaptive, fedyogi_step))
FEDADAGRAD = register("fedadagrad", partial(_build_adaptive, fedadagrad_step))
