"""Secure-aggregation primitives: the AES-CTR mask generator, Shamir sharing, sealed shares."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from fedtune.errors import MessageError
from fedtune.privacy import secagg_crypto as crypto
from fedtune.privacy.shamir import PRIME, SHARE_BYTES, Share, reconstruct_secret, split_secret

SEED = bytes(range(32))


def _digest(values: np.ndarray) -> str:
    return hashlib.sha256(values.astype("<u8").tobytes()).hexdigest()


def test_prg_known_answer() -> None:
    # FIPS-197 style known answer: AES-256 with the all-zero key on the all-zero block.
    first = crypto.expand_mask(bytes(32), 2)
    block = bytes.fromhex("dc95c078a2408989ad48a21492842087")
    assert first.tolist() == np.frombuffer(block, dtype="<u8").tolist()


def test_prg_deterministic_and_prefix_stable() -> None:
    a = crypto.expand_mask(SEED, 3000)
    assert np.array_equal(a, crypto.expand_mask(SEED, 3000))
    assert np.array_equal(a[:10], crypto.expand_mask(SEED, 10))
    assert not np.array_equal(a, crypto.expand_mask(bytes(32), 3000))


def test_prg_same_in_another_process() -> None:
    code = (
        "import hashlib; from fedtune.privacy.secagg_crypto import expand_mask; "
        "m = expand_mask(bytes(range(32)), 5000); "
        "print(hashlib.sha256(m.astype('<u8').tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(crypto.expand_mask(SEED, 5000))


def test_pairwise_seed_agrees_from_both_sides() -> None:
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    ab = crypto.mask_seed(a, crypto.public_bytes(b), "s", "alice", "bob")
    ba = crypto.mask_seed(b, crypto.public_bytes(a), "s", "bob", "alice")
    assert ab == ba and len(ab) == 32
    assert crypto.mask_seed(a, crypto.public_bytes(b), "other round", "alice", "bob") != ab


def test_shamir_exact_threshold_any_subset() -> None:
    secret = bytes(range(1, 33))
    shares = split_secret(secret, 3, 5)
    for subset in ([0, 1, 2], [2, 3, 4], [0, 2, 4], [4, 1, 3]):
        assert reconstruct_secret([shares[i] for i in subset], 3, 32) == secret
    assert reconstruct_secret(shares, 3, 32) == secret  # extra shares checked, consistent


def test_shamir_below_threshold_refused_or_garbage() -> None:
    secret = b"\xff" * 32
    shares = split_secret(secret, 3, 5)
    with pytest.raises(ValueError, match="3 needed"):
        reconstruct_secret(shares[:2], 3, 32)
    # Pretending t - 1 shares are enough gives a random field element, not the secret.
    # Usually it does not even fit in 32 bytes (MessageError).
    with contextlib.suppress(MessageError):
        assert reconstruct_secret(shares[:2], 2, 32) != secret


def test_shamir_detects_tampered_and_duplicate_shares() -> None:
    shares = split_secret(b"k" * 32, 3, 5)
    bad = Share(shares[4].x, (shares[4].y + 1) % PRIME)
    with pytest.raises(MessageError, match="inconsistent"):
        reconstruct_secret([*shares[:4], bad], 3, 32)
    with pytest.raises(MessageError, match="duplicate"):
        reconstruct_secret([shares[0], shares[1], shares[1]], 3, 32)


def test_share_bytes_round_trip_and_checks() -> None:
    share = split_secret(b"x" * 32, 2, 3)[2]
    assert Share.from_bytes(share.to_bytes()) == share
    with pytest.raises(MessageError):
        Share.from_bytes(share.to_bytes()[:-1])
    with pytest.raises(MessageError, match="x-coordinate 0"):
        Share.from_bytes(bytes(SHARE_BYTES))
    with pytest.raises(MessageError, match="outside the field"):
        Share.from_bytes(b"\x00\x01" + b"\xff" * (SHARE_BYTES - 2))


def test_sealed_share_tamper_and_misroute_rejected() -> None:
    key = bytes(32)
    blob = crypto.seal(key, b"p" * 10, b"aad")
    assert crypto.open_sealed(key, blob, b"aad", 10, "t") == b"p" * 10
    flipped = bytes([blob[0]]) + bytes([blob[1] ^ 1]) + blob[2:]
    for bad_blob, aad in ((flipped, b"aad"), (blob, b"other")):
        with pytest.raises(MessageError, match="authentication"):
            crypto.open_sealed(key, bad_blob, aad, 10, "t")
    with pytest.raises(MessageError, match="bytes"):
        crypto.open_sealed(key, blob[:-1], b"aad", 10, "t")


def test_degenerate_public_key_rejected() -> None:
    with pytest.raises(MessageError, match="degenerate"):
        crypto.mask_seed(crypto.generate_private_key(), bytes(32), "s", "a", "b")
