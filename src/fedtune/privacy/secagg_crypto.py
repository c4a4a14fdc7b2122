"""Secure-aggregation primitives from `cryptography`: X25519 + HKDF seeds, AES-CTR masks, AES-GCM sealing.

Mask generator: AES-256 in counter mode, keyed by the 32-byte seed, counter block
starting at zero, encrypting zeros; the keystream is read as little-endian uint64. It is
a cryptographic PRG (unlike numpy's PCG64/Philox streams, whose outputs are predictable
from a few samples), it is fully specified by the AES standard, so it is the same in
every process, version and platform (tests pin a known-answer value), and it is fast
(AES-NI). Every seed is used for exactly one stream: seeds come from HKDF with the round's
session string and the party names in ``info``, or are fresh random self-mask seeds.

Byte strings fed to HKDF ``info`` are length-prefixed (``context``), so no two different
lists of names can produce the same context.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.errors import MessageError

PROTOCOL = b"fedtune-secagg/v1"
KEY_BYTES = 32
SEED_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_COUNTER_START = bytes(16)
_CHUNK_ELEMENTS = 1 << 20


def context(*parts: str | bytes) -> bytes:
    """PROTOCOL then each part as (4-byte length, bytes): an unambiguous HKDF info / AAD."""
    out = [PROTOCOL]
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        out.append(struct.pack(">I", len(data)) + data)
    return b"".join(out)


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (one per round and purpose)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the key's public half."""
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (only ever secret-shared, never sent in clear)."""
    return key.private_bytes_raw()


def load_public_key(data: bytes, what: str) -> X25519PublicKey:
    """An X25519 public key from 32 raw bytes; MessageError naming ``what`` otherwise."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != KEY_BYTES:
        raise MessageError(f"{what}: an X25519 public key is {KEY_BYTES} raw bytes")
    return X25519PublicKey.from_public_bytes(bytes(data))


def check_public_key(data: bytes, what: str) -> bytes:
    """The bytes of a usable X25519 public key: 32 bytes, not a low-order point."""
    agree(X25519PrivateKey.generate(), load_public_key(data, what), b"check", what)
    return bytes(data)


def load_private_key(data: bytes, what: str) -> X25519PrivateKey:
    """An X25519 private key from 32 raw bytes; MessageError naming ``what`` otherwise."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != KEY_BYTES:
        raise MessageError(f"{what}: an X25519 private key is {KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(bytes(data))


def agree(private: X25519PrivateKey, peer: X25519PublicKey, info: bytes, what: str) -> bytes:
    """HKDF-SHA256(X25519(private, peer), info) -> 32 bytes; MessageError for a degenerate key."""
    try:
        shared = private.exchange(peer)
    except ValueError as exc:  # low-order point: the shared secret would be all zeros
        raise MessageError(f"{what}: public key gives a degenerate shared secret") from exc
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def expand_mask(seed: bytes, n_elements: int) -> np.ndarray:
    """n_elements uint64 mask values: the AES-256-CTR keystream of ``seed``, little-endian."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    if n_elements < 0:
        raise ValueError("n_elements must be >= 0")
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_COUNTER_START)).encryptor()
    out = np.empty(n_elements, dtype=np.uint64)
    for start in range(0, n_elements, _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, n_elements)
        stream = encryptor.update(bytes(8 * (stop - start)))
        out[start:stop] = np.frombuffer(stream, dtype="<u8")
    return out


def commitment(seed: bytes, info: bytes) -> bytes:
    """SHA-256(info || seed): binds a client to its self-mask seed without revealing it."""
    return hashlib.sha256(info + bytes(seed)).digest()


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: random 12-byte nonce || ciphertext || 16-byte tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, plaintext_bytes: int, what: str) -> bytes:
    """Decrypt and authenticate a sealed blob of a known plaintext size; MessageError otherwise."""
    expected = NONCE_BYTES + plaintext_bytes + TAG_BYTES
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != expected:
        raise MessageError(f"{what}: a sealed share is {expected} bytes")
    try:
        return AESGCM(key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), aad)
    except InvalidTag as exc:
        raise MessageError(
            f"{what}: sealed share fails authentication (tampered or misrouted)"
        ) from exc


def mask_seed(
    private: X25519PrivateKey, peer_mask_key: bytes, session: str, a: str, b: str
) -> bytes:
    """The pairwise mask seed s_ab of clients a and b (the same from either side)."""
    what = f"mask key of {b!r}"
    info = context("mask", session, *sorted((a, b)))
    return agree(private, load_public_key(peer_mask_key, what), info, what)


def share_key(
    private: X25519PrivateKey, peer_share_key: bytes, session: str, sender: str, receiver: str
) -> bytes:
    """The AES-GCM key for shares sent from ``sender`` to ``receiver`` (one key per direction)."""
    what = f"share key between {sender!r} and {receiver!r}"
    info = context("share", session, sender, receiver)
    return agree(private, load_public_key(peer_share_key, what), info, what)


def share_aad(session: str, sender: str, receiver: str) -> bytes:
    """Associated data binding a sealed share to its round, sender and receiver."""
    return context("share-aad", session, sender, receiver)


def self_commitment(seed: bytes, session: str, name: str) -> bytes:
    """A client's commitment to its self-mask seed, bound to the round and its name."""
    return commitment(seed, context("self-commit", session, name))
