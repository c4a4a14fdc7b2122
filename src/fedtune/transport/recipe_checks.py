"""What the transport checks in a recipe: transport.address is host:port (registered with
fedtune.config.checks)."""

from __future__ import annotations

from fedtune.config.checks import register_check


def address(value: str) -> None:
    from fedtune.transport.auth import parse_address

    parse_address(value)


register_check("transport.address", address)
