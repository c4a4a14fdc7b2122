"""Federated algorithms, registered by name."""

from __future__ import annotations


def available_algorithms() -> list[str]:
    return ["fedavg"]
