"""Random bytes and JSON-like junk fed to every secure-aggregation parser raise only MessageError."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.errors import MessageError
from fedtune.privacy import secagg_crypto as crypto
from fedtune.privacy import secagg_wire as wire
from fedtune.privacy.secagg import SecAggClient, SecAggError, SecAggServer
from fedtune.privacy.shamir import SHARE_BYTES, Share

NAMES = ["a", "b", "c"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
hexish = st.binary(max_size=200).map(bytes.hex) | st.text(alphabet="0123456789abcdefABCDEF ")


def _expect_message_error(call) -> None:
    """Any outcome but an exception other than MessageError."""
    with contextlib.suppress(MessageError):
        call()


@FAST
@given(st.binary(max_size=2 * SHARE_BYTES))
def test_share_from_random_bytes(data: bytes) -> None:
    _expect_message_error(lambda: Share.from_bytes(data))


@FAST
@given(st.binary(max_size=200), st.binary(max_size=20))
def test_open_sealed_random_bytes(blob: bytes, aad: bytes) -> None:
    with pytest.raises(MessageError):
        crypto.open_sealed(bytes(32), blob, aad, wire.SHARE_PLAINTEXT_BYTES, "fuzz")


@FAST
@given(st.binary(max_size=40))
def test_public_key_and_seed_from_random_bytes(data: bytes) -> None:
    private = crypto.generate_private_key()
    _expect_message_error(lambda: crypto.mask_seed(private, data, "s", "a", "b"))
    _expect_message_error(lambda: crypto.load_private_key(data, "fuzz"))


@FAST
@given(json_like | st.dictionaries(st.sampled_from(NAMES + ["x"]), json_like, max_size=4))
def test_json_parsers_on_junk(value: object) -> None:
    _expect_message_error(lambda: wire.parse_advert(value, "fuzz"))
    _expect_message_error(lambda: wire.parse_key_set(value, NAMES, "fuzz"))
    _expect_message_error(lambda: wire.parse_sealed_shares(value, NAMES, "fuzz", exact=False))
    _expect_message_error(lambda: wire.parse_unmask_request(value, "fuzz"))
    _expect_message_error(lambda: wire.parse_unmask_reply(value, ["a", "b"], ["c"], "fuzz"))
    layout = wire.make_layout({"w": (2,)})
    _expect_message_error(lambda: wire.parse_masked_input(value, layout, "fuzz"))


@FAST
@given(hexish, st.sampled_from(NAMES))
def test_hex_share_maps_on_junk(blob: str, name: str) -> None:
    value = {"self_shares": {"a": blob, "b": blob}, "key_shares": {"c": blob}}
    _expect_message_error(lambda: wire.parse_unmask_reply(value, ["a", "b"], ["c"], "fuzz"))
    _expect_message_error(lambda: wire.parse_sealed_shares({name: blob}, NAMES, "f", exact=True))


@FAST
@given(st.dictionaries(st.sampled_from(NAMES), hexish, max_size=3))
def test_client_receiving_junk_shares(shares: dict[str, str]) -> None:
    """Junk in place of the sealed shares is refused, and leaves the client able to go on."""
    clients = {n: SecAggClient(n, NAMES, 2) for n in NAMES}
    server = SecAggServer(NAMES, 2, {"w": (2,)})
    broadcast = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(broadcast) for n, c in clients.items()})
    x = {"w": torch.ones(2)}
    with pytest.raises((MessageError, SecAggError)):  # never a masked input built on junk
        clients["a"].masked_input(x, 1.0, shares=shares)
    masked = clients["a"].masked_input(x, 1.0, shares=routed["a"])
    assert masked and all(t.dtype == torch.int64 for t in masked.values())
