"""Parsing and checking of every secure-aggregation blob a party receives (MessageError with a reason).

Wire shapes (all JSON-native except masked inputs, which are int64 tensors):

- key advert, one client: ``{"share_key": hex32, "mask_key": hex32, "self_commit": hex32}``
- key broadcast / adverts collected by the server: ``{client: advert, ...}``
- sealed shares: ``{peer: hex}``, each SEALED_SHARE_BYTES once decoded
- masked input: ``{tensor name: int64 tensor, ..., WEIGHT_KEY: int64 tensor of shape (1,)}``
- unmask request: ``{"survivors": [client, ...], "dropped": [client, ...]}``
- unmask reply: ``{"self_shares": {survivor: hex}, "key_shares": {dropped: hex}}``
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtune.errors import FedtuneError, MessageError, RecipeError
from fedtune.privacy.secagg_crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    SEED_BYTES,
    TAG_BYTES,
    check_public_key,
)
from fedtune.privacy.secagg_params import check_threshold  # noqa: F401  (wire.check_threshold)
from fedtune.privacy.shamir import SHARE_BYTES, Share

WEIGHT_KEY = "secagg.weight"
MAX_NAME_CHARS = 128
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
SEALED_SHARE_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES
ADVERT_KEYS = ("share_key", "mask_key", "self_commit")
REPLY_KEYS = ("self_shares", "key_shares")
REQUEST_KEYS = ("survivors", "dropped")
_HEX = re.compile(r"[0-9a-f]*")

Layout = tuple[tuple[str, tuple[int, ...]], ...]


class SecAggError(FedtuneError):
    """A secure-aggregation round cannot go on (too few clients left, or a step out of order)."""


@dataclass(frozen=True)
class PublicKeys:
    """What one client advertises: two X25519 public keys and a commitment to its self-mask seed."""

    share_key: bytes
    mask_key: bytes
    self_commit: bytes

    def to_json(self) -> dict[str, str]:
        return {key: getattr(self, key).hex() for key in ADVERT_KEYS}


def peer_list(peers: Sequence[str]) -> list[str]:
    """The configured client names, sorted; RecipeError for a bad or repeated name."""
    if isinstance(peers, str) or not isinstance(peers, (list, tuple, set, frozenset)):
        raise RecipeError("secagg peers must be a list of client names")
    names = []
    for peer in peers:
        if (
            not isinstance(peer, str)
            or not 0 < len(peer) <= MAX_NAME_CHARS
            or not peer.isprintable()
        ):
            raise RecipeError(
                f"secagg peers: {peer!r} is not a printable name of 1..{MAX_NAME_CHARS} chars"
            )
        names.append(peer)
    if len(set(names)) != len(names):
        raise RecipeError("secagg peers: a client name is listed twice")
    return sorted(names)


def check_name(name: Any, what: str) -> str:
    """A party name: a non-empty printable str of at most MAX_NAME_CHARS characters."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise MessageError(
            f"{what}: {str(name)[:40]!r} is not a printable name of 1..{MAX_NAME_CHARS} chars"
        )
    return name


def parse_hex(value: Any, n_bytes: int, what: str) -> bytes:
    """Exactly n_bytes from a lowercase hex string."""
    if not isinstance(value, str) or len(value) != 2 * n_bytes or not _HEX.fullmatch(value):
        raise MessageError(f"{what}: expected {2 * n_bytes} lowercase hex characters")
    return bytes.fromhex(value)


def _mapping(value: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise MessageError(f"{what}: expected a dict, got {type(value).__name__}")
    return value


def _exact_keys(value: Mapping[Any, Any], keys: Iterable[str], what: str) -> None:
    expected = set(keys)
    if set(value) != expected:
        raise MessageError(f"{what}: keys must be exactly {sorted(expected)}")


def parse_advert(value: Any, what: str) -> PublicKeys:
    """One client's key advert."""
    advert = _mapping(value, what)
    _exact_keys(advert, ADVERT_KEYS, what)
    share_key = parse_hex(advert["share_key"], KEY_BYTES, f"{what} share_key")
    mask_key = parse_hex(advert["mask_key"], KEY_BYTES, f"{what} mask_key")
    return PublicKeys(
        share_key=check_public_key(share_key, f"{what} share_key"),
        mask_key=check_public_key(mask_key, f"{what} mask_key"),
        self_commit=parse_hex(advert["self_commit"], SEED_BYTES, f"{what} self_commit"),
    )


def parse_key_set(value: Any, peers: Iterable[str], what: str) -> dict[str, PublicKeys]:
    """Adverts by client name; every name a configured peer, no public key used twice."""
    allowed = set(peers)
    adverts = _mapping(value, what)
    out: dict[str, PublicKeys] = {}
    for name, advert in adverts.items():
        if check_name(name, what) not in allowed:
            raise MessageError(f"{what}: {name!r} is not a client of this round")
        out[name] = parse_advert(advert, f"{what} for {name!r}")
    keys = [k for adv in out.values() for k in (adv.share_key, adv.mask_key)]
    if len(set(keys)) != len(keys):
        raise MessageError(f"{what}: a public key appears twice (replayed or copied key)")
    return dict(sorted(out.items()))


def parse_sealed_shares(
    value: Any, allowed: Iterable[str], what: str, *, exact: bool
) -> dict[str, bytes]:
    """Sealed share blobs by peer name: names within ``allowed`` (all of them when exact)."""
    names = set(allowed)
    shares = _mapping(value, what)
    out: dict[str, bytes] = {}
    for name, blob in shares.items():
        if check_name(name, what) not in names:
            raise MessageError(f"{what}: no share expected for/from {name!r}")
        out[name] = parse_hex(blob, SEALED_SHARE_BYTES, f"{what} for {name!r}")
    if exact and set(out) != names:
        raise MessageError(f"{what}: missing shares for {sorted(names - set(out))}")
    return dict(sorted(out.items()))


def parse_names(value: Any, what: str) -> list[str]:
    """A list of distinct party names."""
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"{what}: expected a list of names, got {type(value).__name__}")
    names = [check_name(name, what) for name in value]
    if len(set(names)) != len(names):
        raise MessageError(f"{what}: a name is listed twice")
    return names


def parse_unmask_request(value: Any, what: str) -> tuple[list[str], list[str]]:
    """(survivors, dropped), disjoint."""
    request = _mapping(value, what)
    _exact_keys(request, REQUEST_KEYS, what)
    survivors = parse_names(request["survivors"], f"{what} survivors")
    dropped = parse_names(request["dropped"], f"{what} dropped")
    if set(survivors) & set(dropped):
        raise MessageError(f"{what}: a client is both a survivor and dropped")
    return survivors, dropped


def parse_unmask_reply(
    value: Any, survivors: Iterable[str], dropped: Iterable[str], what: str
) -> tuple[dict[str, Share], dict[str, Share]]:
    """(self-mask shares of every survivor, mask-key shares of every dropped client)."""
    reply = _mapping(value, what)
    _exact_keys(reply, REPLY_KEYS, what)
    parts = []
    for key, names in (("self_shares", survivors), ("key_shares", dropped)):
        shares = _mapping(reply[key], f"{what} {key}")
        _exact_keys(shares, names, f"{what} {key}")
        parts.append(
            {
                n: Share.from_bytes(parse_hex(shares[n], SHARE_BYTES, f"{what} {key} {n!r}"))
                for n in sorted(shares)
            }
        )
    return parts[0], parts[1]


def make_layout(shapes: Mapping[str, Sequence[int]]) -> Layout:
    """Tensor names in sorted order with their shapes, then WEIGHT_KEY of shape (1,)."""
    layout = []
    for name in sorted(shapes):
        if not isinstance(name, str) or not name or name == WEIGHT_KEY:
            raise ValueError(f"tensor name {name!r} is empty or reserved")
        shape = tuple(shapes[name])
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r} has an invalid shape {shape}")
        layout.append((name, shape))
    return (*layout, (WEIGHT_KEY, (1,)))


def layout_size(layout: Layout) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)


def parse_masked_input(value: Any, layout: Layout, what: str) -> np.ndarray:
    """A masked input as one flat uint64 vector in layout order; names, dtypes and shapes checked."""
    tensors = _mapping(value, what)
    _exact_keys(tensors, (name for name, _ in layout), what)
    parts = []
    for name, shape in layout:
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64:
            raise MessageError(f"{what}: tensor {name!r} must be an int64 torch tensor")
        if tuple(tensor.shape) != shape:
            raise MessageError(
                f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        parts.append(tensor.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def unflatten(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays (copies) of the layout's shapes."""
    out, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[offset : offset + size].reshape(shape).copy()
        offset += size
    return out
