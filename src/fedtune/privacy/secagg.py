"""Secure aggregation (Bonawitz et al., CCS 2017, semi-honest variant): the server learns only the weighted sum.

Rounds, each a plain-data exchange (JSON-native dicts, int64 tensors; never pickle)::

    0  client.advertise_keys()           -> advert           server.collect_keys({c: advert})   -> broadcast
    1  client.share_keys(broadcast)      -> {peer: sealed}   server.route_shares({c: sealed})   -> {c: {peer: sealed}}
    2  client.masked_input(x, w, shares=...) -> int64 tensors  server.unmask_request({c: y})  -> request
    3  client.unmask_reply(**request)    -> reply            server.aggregate({c: reply})       -> SecAggResult

Client u holds two X25519 key pairs, as in the paper: the *share* pair (c_u) only
encrypts secret shares in transit (AES-256-GCM under HKDF(X25519(c_u, c_v)), one key per
direction); the *mask* pair (s_u) yields the pairwise mask seeds s_uv = HKDF(X25519(s_u,
s_v)). They are separate so that revealing a dropped client's mask key (step 3) does not
also reveal the keys protecting the shares it exchanged. Its masked input is::

    y_u = enc(w_u x_u) + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)   (mod 2^64)

with b_u a fresh random self-mask seed, PRG = AES-256-CTR (secagg_crypto), enc the
fixed-point code (fixedpoint). b_u and the mask private key are Shamir-shared t-of-n
(shamir) among the clients. For the unmasking the server names survivors and dropped
clients; each remaining client reveals its shares of b_u for survivors and of the mask
key for dropped ones, never both for the same client, and only once per round. With at
least t replies the server removes all masks: pairwise masks between survivors cancel,
those towards dropped clients are recomputed from their rebuilt keys.

Dropouts: a client may vanish at any step; the round finishes while at least t clients
answered every step (t > n/2 is required). Below t the server and the clients stop with
SecAggError. A client that misses step 1 is simply not part of the masks; one that
misses step 2 or 3 is unmasked through its shared key / not needed.

Threat model. Protected: against an honest-but-curious server (follows the protocol,
reads everything), plus fewer than t colluding clients, an individual input (and weight)
is hidden: the server sees only the sum of the survivors' w_u x_u and of their weights. A
late masked input from a client declared dropped still carries its self-mask b_u, which is
never revealed. Not protected: a malicious server can lie about who dropped to different
clients (there is no signed consistency round, no PKI: the server relays public keys and
could substitute its own, i.e. man-in-the-middle every pair) and so unmask individual
inputs; authenticate clients at the transport (mutual TLS) and treat this as
semi-honest only. Also not protected: the sum itself (use differential privacy for that),
which clients took part, the tensor shapes, a client that sends garbage (it corrupts the
sum; nothing here can see inside a mask), and timing. Each client object serves one
round: masking twice with the same masks would leak the difference of the two inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedtune.errors import MessageError, RecipeError
from fedtune.privacy import secagg_crypto as crypto
from fedtune.privacy import secagg_wire as wire
from fedtune.privacy.fixedpoint import FixedPointCodec
from fedtune.privacy.secagg_server import SecAggResult, SecAggServer
from fedtune.privacy.secagg_wire import WEIGHT_KEY, PublicKeys, SecAggError
from fedtune.privacy.shamir import SHARE_BYTES, Share, split_secret

__all__ = [
    "WEIGHT_KEY",
    "FixedPointCodec",
    "SecAggClient",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
]


class SecAggClient:
    """One client's side of one secure-aggregation round."""

    def __init__(
        self,
        name: str,
        peers: Sequence[str],
        threshold: int,
        codec: FixedPointCodec | None = None,
        session: str = "",
    ) -> None:
        self.peers = wire.peer_list(peers)
        if name not in self.peers:
            raise RecipeError(f"secagg client {name!r} is not among the peers {self.peers}")
        wire.check_threshold(threshold, len(self.peers))
        self.name = name
        self.threshold = threshold
        self.codec = codec or FixedPointCodec()
        self.codec.check_capacity(len(self.peers))
        self.session = str(session)
        self._index = {p: i + 1 for i, p in enumerate(self.peers)}
        self._share_private = crypto.generate_private_key()
        self._mask_private = crypto.generate_private_key()
        self._self_seed = os.urandom(crypto.SEED_BYTES)
        self._stage = "new"
        self._advert = PublicKeys(
            crypto.public_bytes(self._share_private),
            crypto.public_bytes(self._mask_private),
            crypto.self_commitment(self._self_seed, self.session, name),
        ).to_json()
        self._keys: dict[str, PublicKeys] = {}
        self._own: tuple[Share, Share] | None = None  # (mask-key share, self-mask share) kept
        self._held: dict[str, tuple[Share, Share]] = {}  # holder's shares of each client's secrets
        self._group: list[str] = []

    def _require(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggError(
                f"secagg client {self.name!r}: step out of order (at '{self._stage}')"
            )

    def _advance(self, expected: str, to: str) -> None:
        self._require(expected)
        self._stage = to

    def advertise_keys(self) -> dict[str, str]:
        """Step 0: public keys and the commitment to the self-mask seed."""
        self._advance("new", "advertised")
        return dict(self._advert)

    def share_keys(self, public_keys: Mapping[str, Any]) -> dict[str, str]:
        """Step 1: sealed shares of the mask key and self-mask seed, one per other client."""
        self._require("advertised")
        keys = wire.parse_key_set(public_keys, self.peers, "secagg key broadcast")
        mine = keys.get(self.name)
        if mine is None or mine.to_json() != self._advert:
            raise MessageError(
                f"secagg key broadcast: {self.name!r} is missing or not its own keys"
            )
        if len(keys) < self.threshold:
            raise SecAggError(
                f"secagg: only {len(keys)} clients advertised keys, threshold is {self.threshold}"
            )
        n = len(self.peers)
        key_shares = split_secret(crypto.private_bytes(self._mask_private), self.threshold, n)
        self_shares = split_secret(self._self_seed, self.threshold, n)
        sealed: dict[str, str] = {}
        for peer, peer_keys in keys.items():
            if peer == self.name:
                continue
            i = self._index[peer] - 1
            key = crypto.share_key(
                self._share_private, peer_keys.share_key, self.session, self.name, peer
            )
            plaintext = key_shares[i].to_bytes() + self_shares[i].to_bytes()
            aad = crypto.share_aad(self.session, self.name, peer)
            sealed[peer] = crypto.seal(key, plaintext, aad).hex()
        self._advance("advertised", "shared")
        i = self._index[self.name] - 1
        self._keys, self._own = keys, (key_shares[i], self_shares[i])
        return sealed

    def _open_shares(self, shares: Mapping[str, Any]) -> dict[str, tuple[Share, Share]]:
        """Decrypt and check the shares other clients sealed for this one."""
        others = set(self._keys) - {self.name}
        blobs = wire.parse_sealed_shares(shares, others, "secagg shares received", exact=False)
        held = {}
        for sender, blob in blobs.items():
            what = f"secagg share from {sender!r}"
            key = crypto.share_key(
                self._share_private, self._keys[sender].share_key, self.session, sender, self.name
            )
            aad = crypto.share_aad(self.session, sender, self.name)
            plain = crypto.open_sealed(key, blob, aad, wire.SHARE_PLAINTEXT_BYTES, what)
            pair = (Share.from_bytes(plain[:SHARE_BYTES]), Share.from_bytes(plain[SHARE_BYTES:]))
            if any(share.x != self._index[self.name] for share in pair):
                raise MessageError(f"{what}: the share is addressed to another client")
            held[sender] = pair
        return held

    def masked_input(
        self, x: Mapping[str, torch.Tensor], weight: float, *, shares: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Step 2: enc(weight * x) plus all masks, as int64 tensors (WEIGHT_KEY carries the weight)."""
        self._require("shared")
        try:
            w = self.codec.check_weight(weight)
        except ValueError as exc:
            raise SecAggError(f"secagg client {self.name!r}: {exc}") from None
        layout, flat = _flatten_input(x, self.name)
        held = self._open_shares(shares)
        assert self._own is not None  # set by share_keys, the step before
        held[self.name] = self._own
        group = sorted(held)
        if len(group) < self.threshold:
            raise SecAggError(
                f"secagg: only {len(group)} clients shared keys, threshold is {self.threshold}"
            )
        codes = np.concatenate([self.codec.encode(flat, w), self.codec.encode_weight(w)])
        codes += crypto.expand_mask(self._self_seed, codes.size)
        for peer in group:
            if peer == self.name:
                continue
            seed = crypto.mask_seed(
                self._mask_private, self._keys[peer].mask_key, self.session, self.name, peer
            )
            mask = crypto.expand_mask(seed, codes.size)
            if self.name < peer:
                codes += mask
            else:
                codes -= mask
        self._advance("shared", "masked")
        self._group, self._held = group, held
        return {
            n: torch.from_numpy(a.view(np.int64)) for n, a in wire.unflatten(codes, layout).items()
        }

    def unmask_reply(
        self, survivors: Sequence[str], dropped: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        """Step 3: self-mask shares of survivors, mask-key shares of dropped clients (once)."""
        alive, gone = wire.parse_unmask_request(
            {"survivors": survivors, "dropped": dropped}, "secagg unmask request"
        )
        self._require("masked")
        if set(alive) | set(gone) != set(self._group):
            raise MessageError(
                "secagg unmask request: survivors and dropped must be exactly the clients that shared keys"
            )
        if self.name not in alive:
            raise MessageError(
                f"secagg unmask request: {self.name!r} sent its input but is not listed as a survivor"
            )
        if len(alive) < self.threshold:
            raise SecAggError(
                f"secagg: only {len(alive)} masked inputs, threshold is {self.threshold}"
            )
        self._advance("masked", "done")
        reply = {
            "self_shares": {u: self._held[u][1].to_bytes().hex() for u in sorted(alive)},
            "key_shares": {v: self._held[v][0].to_bytes().hex() for v in sorted(gone)},
        }
        self._held.clear()
        return reply


def _flatten_input(x: Mapping[str, torch.Tensor], name: str) -> tuple[wire.Layout, np.ndarray]:
    """The layout of a client's own float tensors and their values as one float64 vector."""
    if not isinstance(x, Mapping):
        raise SecAggError(f"secagg client {name!r}: input must be a dict of tensors")
    for key, tensor in x.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise SecAggError(f"secagg client {name!r}: input {key!r} must be a float tensor")
        if not bool(torch.isfinite(tensor).all()):
            raise SecAggError(f"secagg client {name!r}: input {key!r} has NaN or inf")
    try:
        layout = wire.make_layout({k: tuple(t.shape) for k, t in x.items()})
    except ValueError as exc:
        raise SecAggError(f"secagg client {name!r}: {exc}") from None
    parts = [x[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k, _ in layout[:-1]]
    return layout, np.concatenate(parts) if parts else np.zeros(0)
