"""The server's side of one secure-aggregation round: relay keys and shares, then remove the masks.

See fedtune.privacy.secagg for the protocol and its threat model. The server never holds
a secret of its own; it refuses (SecAggError) to go past any step that fewer than
``threshold`` clients completed, and checks every blob before use (MessageError).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.errors import MessageError
from fedtune.privacy import secagg_crypto as crypto
from fedtune.privacy import secagg_wire as wire
from fedtune.privacy.fixedpoint import FixedPointCodec
from fedtune.privacy.secagg_wire import WEIGHT_KEY, PublicKeys, SecAggError
from fedtune.privacy.shamir import Share, reconstruct_secret


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked weighted sum sum_u w_u x_u (float32 tensors), sum_u w_u, and who was counted."""

    weighted_sum: dict[str, torch.Tensor]
    total_weight: float
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


class SecAggServer:
    """Collects each step of one round from the clients and returns the sum of survivors' inputs."""

    def __init__(
        self,
        peers: Sequence[str],
        threshold: int,
        shapes: Mapping[str, Sequence[int]],
        codec: FixedPointCodec | None = None,
        session: str = "",
    ) -> None:
        self.peers = wire.peer_list(peers)
        wire.check_threshold(threshold, len(self.peers))
        self.threshold = threshold
        self.codec = codec or FixedPointCodec()
        self.codec.check_capacity(len(self.peers))
        self.session = str(session)
        self.layout = wire.make_layout(shapes)
        self._index = {p: i + 1 for i, p in enumerate(self.peers)}
        self._stage = "keys"
        self._keys: dict[str, PublicKeys] = {}
        self._sharers: list[str] = []
        self._inputs: dict[str, np.ndarray] = {}
        self._dropped: list[str] = []

    def _enough(self, count: int, step: str) -> None:
        if count < self.threshold:
            raise SecAggError(
                f"secagg round stopped: only {count} clients {step}, the threshold is "
                f"{self.threshold} of {len(self.peers)}; the sum cannot be revealed safely"
            )

    def _advance(self, expected: str, to: str) -> None:
        if self._stage != expected:
            raise SecAggError(
                f"secagg server: step out of order (at '{self._stage}', not '{expected}')"
            )
        self._stage = to

    def collect_keys(self, adverts: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """Step 0: {client: advert} -> the key broadcast every client receives."""
        keys = wire.parse_key_set(adverts, self.peers, "secagg key adverts")
        self._enough(len(keys), "advertised keys")
        self._advance("keys", "shares")
        self._keys = keys
        return {name: advert.to_json() for name, advert in keys.items()}

    def route_shares(self, shares: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """Step 1: {sender: {receiver: sealed}} -> {receiver: {sender: sealed}} among the senders."""
        if not isinstance(shares, Mapping):
            raise MessageError("secagg shares: expected a dict of senders")
        checked: dict[str, dict[str, bytes]] = {}
        for sender, sealed in shares.items():
            if wire.check_name(sender, "secagg shares") not in self._keys:
                raise MessageError(f"secagg shares: {sender!r} did not advertise keys")
            others = set(self._keys) - {sender}
            checked[sender] = wire.parse_sealed_shares(
                sealed, others, f"secagg shares of {sender!r}", exact=True
            )
        self._enough(len(checked), "shared keys")
        self._advance("shares", "inputs")
        self._sharers = sorted(checked)
        return {
            receiver: {
                sender: checked[sender][receiver].hex()
                for sender in self._sharers
                if sender != receiver
            }
            for receiver in self._sharers
        }

    def unmask_request(self, masked_inputs: Mapping[str, Any]) -> dict[str, list[str]]:
        """Step 2: {client: masked tensors} -> {"survivors": [...], "dropped": [...]} for every survivor."""
        if not isinstance(masked_inputs, Mapping):
            raise MessageError("secagg masked inputs: expected a dict of clients")
        inputs = {}
        for name, tensors in masked_inputs.items():
            if wire.check_name(name, "secagg masked inputs") not in self._sharers:
                raise MessageError(f"secagg masked inputs: {name!r} did not share keys")
            inputs[name] = wire.parse_masked_input(
                tensors, self.layout, f"secagg masked input of {name!r}"
            )
        self._enough(len(inputs), "sent masked inputs")
        self._advance("inputs", "unmask")
        self._inputs = dict(sorted(inputs.items()))
        self._dropped = [name for name in self._sharers if name not in inputs]
        return {"survivors": list(self._inputs), "dropped": list(self._dropped)}

    def aggregate(self, unmask_replies: Mapping[str, Any]) -> SecAggResult:
        """Step 3: {client: unmask reply} -> the unmasked weighted sum of the survivors."""
        if not isinstance(unmask_replies, Mapping):
            raise MessageError("secagg unmask replies: expected a dict of clients")
        survivors = list(self._inputs)
        self_shares: dict[str, list[Share]] = {u: [] for u in survivors}
        key_shares: dict[str, list[Share]] = {v: [] for v in self._dropped}
        for name, reply in unmask_replies.items():
            if wire.check_name(name, "secagg unmask replies") not in self._inputs:
                raise MessageError(f"secagg unmask replies: {name!r} is not a survivor")
            what = f"secagg unmask reply of {name!r}"
            own, keys = wire.parse_unmask_reply(reply, survivors, self._dropped, what)
            for collected, got in ((self_shares, own), (key_shares, keys)):
                for owner, share in got.items():
                    if share.x != self._index[name]:
                        raise MessageError(
                            f"{what}: share of {owner!r} is not {name!r}'s own share"
                        )
                    collected[owner].append(share)
        self._enough(len(unmask_replies), "answered the unmask request")
        seeds = {u: self._rebuild_self_seed(u, self_shares[u]) for u in survivors}
        keys = {v: self._rebuild_mask_key(v, key_shares[v]) for v in self._dropped}
        self._advance("unmask", "done")
        total = np.sum(np.stack(list(self._inputs.values())), axis=0, dtype=np.uint64)
        for seed in seeds.values():
            total -= crypto.expand_mask(seed, total.size)
        for v, private in keys.items():
            self._remove_pair_masks(total, v, private)
        values = self.codec.decode(total)
        arrays = wire.unflatten(values, self.layout)
        weight = float(arrays.pop(WEIGHT_KEY)[0])
        tensors = {name: torch.from_numpy(a.astype(np.float32)) for name, a in arrays.items()}
        return SecAggResult(tensors, weight, tuple(survivors), tuple(self._dropped))

    def _rebuild_self_seed(self, owner: str, shares: list[Share]) -> bytes:
        seed = reconstruct_secret(shares, self.threshold, crypto.SEED_BYTES)
        if crypto.self_commitment(seed, self.session, owner) != self._keys[owner].self_commit:
            raise MessageError(
                f"secagg: rebuilt self-mask of {owner!r} does not match its commitment"
            )
        return seed

    def _rebuild_mask_key(self, owner: str, shares: list[Share]) -> X25519PrivateKey:
        secret = reconstruct_secret(shares, self.threshold, crypto.KEY_BYTES)
        private = crypto.load_private_key(secret, f"rebuilt mask key of {owner!r}")
        if crypto.public_bytes(private) != self._keys[owner].mask_key:
            raise MessageError(
                f"secagg: rebuilt mask key of {owner!r} does not match its public key"
            )
        return private

    def _remove_pair_masks(
        self, total: np.ndarray, dropped: str, private: X25519PrivateKey
    ) -> None:
        """Undo the masks survivors shared with a dropped client (in place)."""
        for u in self._inputs:
            seed = crypto.mask_seed(private, self._keys[u].mask_key, self.session, dropped, u)
            mask = crypto.expand_mask(seed, total.size)
            if u < dropped:  # u added +PRG(s_uv) for v > u
                total -= mask
            else:
                total += mask
