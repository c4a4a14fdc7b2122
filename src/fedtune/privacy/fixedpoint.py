"""Fixed-point encoding of weighted float tensors into Z_{2^64} (numpy uint64, wrapping) for secure aggregation.

Arithmetic choice: every element lives in Z_{2^64} as a numpy ``uint64``; numpy array
addition, subtraction and negation of ``uint64`` wrap modulo 2^64 by definition, so no
overflow is ever undefined. On the wire the same 64 bits are a torch ``int64`` tensor
(``.view``, no conversion). Decoding reads the sum in the centred (two's complement)
representation, i.e. as a signed 64-bit integer, then divides by 2^frac_bits.

Encoding of one client's value x with weight w (0 <= w <= max_weight)::

    code = round(w * clip(x, -clip, clip) * 2^frac_bits)  (mod 2^64)

so the decoded sum over clients is sum_i w_i x_i (the FedAvg numerator), and the weight
itself is encoded the same way so that only the total weight is revealed.

Precision: each code is within one unit (2^-frac_bits) of the exact w*x: rounding to
nearest plus the float64 rounding of w*x, and the configuration is refused when
w*x*2^frac_bits could exceed 2^53, where float64 stops representing every integer. So
the decoded sum of n clients is within n*2^-frac_bits of sum_i w_i clip(x_i), before the
final cast to float32 (which adds a relative 2^-24).

Overflow: the sum must stay in (-2^63, 2^63). ``check_capacity(n)`` refuses n clients
when n * (max_weight * max(clip, 1) * 2^frac_bits + 1) >= 2^63.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.errors import RecipeError

MODULUS_BITS = 64
_HALF_MODULUS = 2**63
_EXACT_FLOAT = 2**53


@dataclass(frozen=True)
class FixedPointCodec:
    """Encodes w*x into Z_{2^64} with ``frac_bits`` fractional bits; x is clipped to [-clip, clip]."""

    frac_bits: int = 24
    clip: float = 64.0
    max_weight: float = float(2**20)

    def __post_init__(self) -> None:
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int):
            raise RecipeError(f"secagg frac_bits must be an int, got {self.frac_bits!r}")
        if not 0 <= self.frac_bits <= 52:
            raise RecipeError(f"secagg frac_bits must be in [0, 52], got {self.frac_bits}")
        for field, value in (("clip", self.clip), ("max_weight", self.max_weight)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise RecipeError(f"secagg {field} must be a finite number > 0, got {value!r}")
        if self._max_code() > _EXACT_FLOAT:
            raise RecipeError(
                f"secagg max_weight * clip * 2^frac_bits = {self._max_code():.3g} exceeds 2^53, "
                "so codes would lose precision: lower frac_bits, clip or max_weight "
                "(e.g. normalise weights to fractions)"
            )

    @property
    def scale(self) -> float:
        """2^frac_bits: one unit of the encoding is 1/scale."""
        return float(2**self.frac_bits)

    def _max_code(self) -> float:
        return self.max_weight * max(self.clip, 1.0) * self.scale

    def max_clients(self) -> int:
        """The most clients whose summed codes cannot overflow the signed 64-bit range."""
        return int((_HALF_MODULUS - 1) // (math.ceil(self._max_code()) + 1))

    def check_capacity(self, n_clients: int) -> None:
        """Refuse (RecipeError) a round of n_clients whose sum could overflow 2^63."""
        if n_clients > self.max_clients():
            raise RecipeError(
                f"secagg cannot sum {n_clients} clients: n * max_weight * max(clip, 1) * "
                f"2^frac_bits must stay below 2^63 (at most {self.max_clients()} clients with "
                f"frac_bits={self.frac_bits}, clip={self.clip}, max_weight={self.max_weight}); "
                "lower frac_bits, clip or max_weight"
            )

    def error_bound(self, n_clients: int) -> float:
        """Worst-case absolute error of a decoded sum of n_clients codes (before float32)."""
        return n_clients * 2.0**-self.frac_bits

    def check_weight(self, weight: float) -> float:
        """The weight as a float, or ValueError when it is not in [0, max_weight]."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)):
            raise ValueError(f"weight must be a number, got {type(weight).__name__}")
        value = float(weight)
        if not math.isfinite(value) or not 0.0 <= value <= self.max_weight:
            raise ValueError(f"weight must be in [0, {self.max_weight}], got {weight!r}")
        return value

    def encode(self, values: np.ndarray, weight: float) -> np.ndarray:
        """uint64 codes of round(weight * clip(values) * 2^frac_bits); values must be finite."""
        w = self.check_weight(weight)
        x = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("values to encode must be finite (no NaN or inf)")
        scaled = np.rint(np.clip(x, -self.clip, self.clip) * w * self.scale)
        return scaled.astype(np.int64).view(np.uint64)

    def encode_weight(self, weight: float) -> np.ndarray:
        """The weight itself as a one-element code (so only the total weight is revealed)."""
        return self.encode(np.ones(1), weight)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """float64 values of codes read as signed 64-bit integers over 2^frac_bits."""
        signed = np.asarray(codes, dtype=np.uint64).view(np.int64)
        return signed.astype(np.float64) / self.scale

    def clipped_count(self, values: np.ndarray) -> int:
        """How many values encode() would clip (for a client's own diagnostics)."""
        return int(np.count_nonzero(np.abs(np.asarray(values, dtype=np.float64)) > self.clip))


def codec_of(section: Any) -> FixedPointCodec:
    """The codec of a recipe's `federation.secure_aggregation` section."""
    return FixedPointCodec(frac_bits=section.frac_bits, clip=float(section.clip),
                           max_weight=float(section.max_weight))
