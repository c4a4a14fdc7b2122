"""Seeds derived from (recipe seed, round, client, purpose), so any party can recompute them."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(base: int, *parts: object) -> int:
    """A 63-bit seed that depends only on `base` and `parts` (stable across processes and machines)."""
    text = "/".join([str(int(base)), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
