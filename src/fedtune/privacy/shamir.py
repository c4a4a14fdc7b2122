"""Shamir t-of-n secret sharing of short byte strings over the prime field GF(2^521 - 1).

A secret of up to 64 bytes is read as a big-endian integer (always below the Mersenne
prime 2^521 - 1); shares are points (x, f(x)) of a random polynomial of degree t - 1
with f(0) = secret, x = 1..n. Any t shares give f(0) by Lagrange interpolation; t - 1
shares say nothing about it (every secret is equally likely). Reconstruction from more
than t shares checks that the extra ones lie on the same polynomial, so a tampered share
is detected (MessageError) whenever more than t shares are available.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedtune.errors import MessageError

PRIME = 2**521 - 1
_Y_BYTES = 66  # ceil(521 / 8)
MAX_X = 2**16 - 1
SHARE_BYTES = 2 + _Y_BYTES
MAX_SECRET_BYTES = 64


@dataclass(frozen=True)
class Share:
    """One point (x, y) of a sharing polynomial; x in [1, 65535], y in [0, PRIME)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """x (2 bytes) then y (66 bytes), both big-endian: SHARE_BYTES in all."""
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse SHARE_BYTES bytes; MessageError for a wrong size or an out-of-range point."""
        if not isinstance(data, (bytes, bytearray)):
            raise MessageError(f"a share must be bytes, got {type(data).__name__}")
        if len(data) != SHARE_BYTES:
            raise MessageError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x = int.from_bytes(data[:2], "big")
        y = int.from_bytes(data[2:], "big")
        if x == 0:
            raise MessageError("share x-coordinate 0 would be the secret itself")
        if y >= PRIME:
            raise MessageError("share value is outside the field")
        return cls(x, y)


def split_secret(secret: bytes, threshold: int, n_shares: int) -> list[Share]:
    """n_shares shares at x = 1..n_shares, any ``threshold`` of which rebuild ``secret``."""
    if not isinstance(secret, (bytes, bytearray)) or not 0 < len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes")
    if not 1 <= threshold <= n_shares <= MAX_X:
        raise ValueError(f"need 1 <= threshold <= n_shares <= {MAX_X}, got {threshold}, {n_shares}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in range(1, n_shares + 1)]


def reconstruct_secret(shares: Sequence[Share], threshold: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` shares.

    ValueError when fewer than ``threshold`` shares are given (the caller decides the
    round cannot go on); MessageError for duplicate x-coordinates, shares that disagree
    with each other, or a result that is not a ``length``-byte secret.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares given, {threshold} needed")
    xs = [share.x for share in shares]
    if len(set(xs)) != len(xs):
        raise MessageError("duplicate shares (the same x-coordinate twice)")
    for share in shares:
        if not (1 <= share.x <= MAX_X and 0 <= share.y < PRIME):
            raise MessageError(f"share point ({share.x}, ...) is outside the field")
    ordered = sorted(shares, key=lambda share: share.x)
    base, extra = ordered[:threshold], ordered[threshold:]
    for share in extra:
        if _interpolate(base, share.x) != share.y:
            raise MessageError(f"share at x={share.x} is inconsistent with the others")
    value = _interpolate(base, 0)
    if value >= 1 << (8 * length):
        raise MessageError(f"shares do not rebuild a {length}-byte secret (tampered or too few)")
    return value.to_bytes(length, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    """f(x) mod PRIME by Horner's rule."""
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % PRIME
    return result


@lru_cache(maxsize=256)
def _basis(xs: tuple[int, ...], z: int) -> tuple[int, ...]:
    """Lagrange basis values l_j(z) for nodes xs (cached: a round reuses one set of nodes)."""
    basis = []
    for j, xj in enumerate(xs):
        numerator, denominator = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * (z - xm) % PRIME
                denominator = denominator * (xj - xm) % PRIME
        basis.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(basis)


def _interpolate(points: Sequence[Share], z: int) -> int:
    """The polynomial through ``points`` evaluated at z."""
    basis = _basis(tuple(point.x for point in points), z)
    return sum(point.y * b for point, b in zip(points, basis)) % PRIME
