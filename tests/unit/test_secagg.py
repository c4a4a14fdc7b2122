"""Secure aggregation rounds: the server learns the weighted sum, survives dropouts, refuses below t."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from fedtune.errors import MessageError, RecipeError
from fedtune.privacy.fixedpoint import FixedPointCodec
from fedtune.privacy.secagg import (
    WEIGHT_KEY,
    SecAggClient,
    SecAggError,
    SecAggResult,
    SecAggServer,
)

NAMES = ["c0", "c1", "c2", "c3", "c4"]
SHAPES = {"lora_A": (4, 3), "lora_B": (3, 4), "bias": (5,)}
FRAC_BITS = 24


def make_inputs(seed: int = 0) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: ({k: torch.randn(s, generator=g) for k, s in SHAPES.items()}, float(10 * i + 3))
        for i, n in enumerate(NAMES)
    }


def make_parties(threshold: int = 3, session: str = "run/round-1"):
    codec = FixedPointCodec(frac_bits=FRAC_BITS)
    clients = {n: SecAggClient(n, NAMES, threshold, codec, session) for n in NAMES}
    server = SecAggServer(NAMES, threshold, SHAPES, codec, session)
    return clients, server


def run_round(
    inputs,
    threshold: int = 3,
    drop_before_shares: Iterable[str] = (),
    drop_before_input: Iterable[str] = (),
    drop_before_unmask: Iterable[str] = (),
) -> SecAggResult:
    clients, server = make_parties(threshold)
    broadcast = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    sharing = [n for n in clients if n not in set(drop_before_shares)]
    routed = server.route_shares({n: clients[n].share_keys(broadcast) for n in sharing})
    senders = [n for n in routed if n not in set(drop_before_input)]
    masked = {
        n: clients[n].masked_input(inputs[n][0], inputs[n][1], shares=routed[n]) for n in senders
    }
    request = server.unmask_request(masked)
    repliers = [n for n in request["survivors"] if n not in set(drop_before_unmask)]
    return server.aggregate({n: clients[n].unmask_reply(**request) for n in repliers})


def expected_sum(inputs, names: Iterable[str]) -> tuple[dict[str, torch.Tensor], float]:
    names = list(names)
    total = {k: sum(inputs[n][1] * inputs[n][0][k].double() for n in names) for k in SHAPES}
    return total, sum(inputs[n][1] for n in names)


def assert_close_to_sum(result: SecAggResult, inputs, names: Iterable[str]) -> None:
    names = list(names)
    total, weight = expected_sum(inputs, names)
    bound = len(names) * 2.0**-FRAC_BITS
    assert set(result.weighted_sum) == set(SHAPES)
    for k, expected in total.items():
        got = result.weighted_sum[k]
        assert got.dtype == torch.float32 and tuple(got.shape) == SHAPES[k]
        tol = bound + expected.abs() * 2.0**-23  # plus the final float32 rounding
        assert torch.all((got.double() - expected).abs() <= tol)
    assert abs(result.total_weight - weight) <= bound
    assert sorted(result.survivors) == sorted(names)


def test_masked_sum_equals_fedavg_numerator() -> None:
    inputs = make_inputs()
    result = run_round(inputs)
    assert_close_to_sum(result, inputs, NAMES)
    assert result.dropped == ()
    # FedAvg = sum / total weight, the same as averaging in the clear.
    total, weight = expected_sum(inputs, NAMES)
    fedavg = result.weighted_sum["lora_A"] / result.total_weight
    assert torch.allclose(fedavg.double(), total["lora_A"] / weight, atol=1e-6)


@pytest.mark.parametrize("dropped", [["c1"], ["c0", "c4"], ["c2", "c3"]])
def test_dropouts_after_key_sharing_are_survived(dropped: list[str]) -> None:
    inputs = make_inputs(1)
    result = run_round(inputs, drop_before_input=dropped)
    assert_close_to_sum(result, inputs, [n for n in NAMES if n not in dropped])
    assert list(result.dropped) == sorted(dropped)


@pytest.mark.parametrize(
    ("steps", "counted", "dropped"),
    [
        ({"drop_before_shares": ["c4"], "drop_before_input": ["c0"]}, ["c1", "c2", "c3"], ("c0",)),
        ({"drop_before_shares": ["c4"], "drop_before_unmask": ["c2"]}, NAMES[:4], ()),
        (
            {"drop_before_input": ["c1"], "drop_before_unmask": ["c3"]},
            ["c0", "c2", "c3", "c4"],
            ("c1",),
        ),
    ],
)
def test_dropouts_at_different_steps(steps: dict, counted: list[str], dropped: tuple) -> None:
    """c4 never shares keys / c0 never sends its input / c2 masks but never unmasks."""
    inputs = make_inputs(2)
    result = run_round(inputs, **steps)
    assert_close_to_sum(result, inputs, counted)
    assert result.dropped == dropped


def test_below_threshold_refused_at_each_step() -> None:
    inputs = make_inputs()
    with pytest.raises(SecAggError, match="only 2 clients shared keys"):
        run_round(inputs, drop_before_shares=["c0", "c1", "c2"])
    with pytest.raises(SecAggError, match="only 2 clients sent masked inputs"):
        run_round(inputs, drop_before_input=["c0", "c1", "c2"])
    with pytest.raises(SecAggError, match="only 2 clients answered"):
        run_round(inputs, drop_before_unmask=["c0", "c1", "c2"])
    _, server = make_parties()
    with pytest.raises(SecAggError, match="threshold is 3 of 5"):
        server.collect_keys({})


def test_threshold_must_be_a_majority() -> None:
    for bad in (2, 1, 6):
        with pytest.raises(RecipeError, match="threshold"):
            SecAggServer(NAMES, bad, SHAPES)
    with pytest.raises(RecipeError, match="not among the peers"):
        SecAggClient("zz", NAMES, 3)


def test_single_masked_input_looks_uniform() -> None:
    clients, server = make_parties()
    broadcast = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(broadcast) for n, c in clients.items()})
    x = {k: torch.zeros(s) for k, s in SHAPES.items()}
    x["big"] = torch.zeros(4096)
    y = clients["c0"].masked_input(x, 1.0, shares=routed["c0"])["big"].numpy().view(np.uint64)
    # The input is all zeros; the masked values are spread over the whole of Z_2^64.
    assert np.mean(y >> np.uint64(63)) == pytest.approx(0.5, abs=0.05)
    assert np.median(np.abs(y.view(np.int64).astype(np.float64))) > 2.0**60
    assert len(np.unique(y)) == y.size
    assert y.view(np.int64).astype(np.float64).std() > 2.0**61


def test_weight_is_masked_too() -> None:
    clients, server = make_parties()
    broadcast = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(broadcast) for n, c in clients.items()})
    x = {k: torch.zeros(s) for k, s in SHAPES.items()}
    y = clients["c1"].masked_input(x, 7.0, shares=routed["c1"])
    assert y[WEIGHT_KEY].dtype == torch.int64 and y[WEIGHT_KEY].shape == (1,)
    assert abs(int(y[WEIGHT_KEY][0])) > 2**40  # not 7 * 2^24


def _through_shares(clients, server):
    broadcast = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    return broadcast, server.route_shares({n: c.share_keys(broadcast) for n, c in clients.items()})


def test_tampered_share_blob_rejected() -> None:
    clients, server = make_parties()
    _, routed = _through_shares(clients, server)
    blob = routed["c2"]["c0"]
    routed["c2"]["c0"] = blob[:40] + ("0" if blob[40] != "0" else "1") + blob[41:]
    x = {k: torch.zeros(s) for k, s in SHAPES.items()}
    with pytest.raises(MessageError, match="authentication"):
        clients["c2"].masked_input(x, 1.0, shares=routed["c2"])
    # A share meant for c3 relayed to c2 fails too (wrong key and associated data).
    routed["c2"]["c0"] = routed["c3"]["c0"]
    with pytest.raises(MessageError, match="authentication"):
        clients["c2"].masked_input(x, 1.0, shares=routed["c2"])


def test_duplicate_and_misattributed_unmask_shares_rejected() -> None:
    clients, server = make_parties()
    _, routed = _through_shares(clients, server)
    inputs = make_inputs()
    masked = {
        n: c.masked_input(*inputs[n], shares=routed[n]) for n, c in clients.items() if n != "c4"
    }
    request = server.unmask_request(masked)
    replies = {n: clients[n].unmask_reply(**request) for n in request["survivors"]}
    replayed = dict(replies, c3=replies["c1"])  # c3 replays c1's shares: duplicates
    with pytest.raises(MessageError, match="not 'c3''s own share"):
        server.aggregate(replayed)
    broken = {k: dict(v) for k, v in replies["c0"].items()}
    broken["key_shares"]["c4"] = replies["c1"]["key_shares"]["c4"]
    with pytest.raises(MessageError):
        server.aggregate(dict(replies, c0=broken))
    assert_close_to_sum(server.aggregate(replies), inputs, ["c0", "c1", "c2", "c3"])


def test_bad_blobs_at_each_step_rejected() -> None:
    clients, server = make_parties()
    adverts = {n: c.advertise_keys() for n, c in clients.items()}
    with pytest.raises(MessageError, match="not a client"):
        server.collect_keys(dict(adverts, intruder=adverts["c0"]))
    with pytest.raises(MessageError, match="appears twice"):
        server.collect_keys(dict(adverts, c1=adverts["c0"]))
    with pytest.raises(MessageError, match="hex"):
        server.collect_keys(dict(adverts, c1=dict(adverts["c1"], mask_key="ab")))
    with pytest.raises(MessageError, match="degenerate"):  # low-order point
        server.collect_keys(dict(adverts, c1=dict(adverts["c1"], mask_key="00" * 32)))
    broadcast = server.collect_keys(adverts)
    forged = dict(broadcast, c0=broadcast["c1"] | {"share_key": broadcast["c2"]["mask_key"]})
    with pytest.raises(MessageError):
        clients["c0"].share_keys(forged)
    shares = {n: c.share_keys(broadcast) for n, c in clients.items()}
    missing = {k: v for k, v in shares["c1"].items() if k != "c2"}
    with pytest.raises(MessageError, match="missing shares"):
        server.route_shares(dict(shares, c1=missing))
    routed = server.route_shares(shares)
    inputs = make_inputs()
    y = clients["c0"].masked_input(*inputs["c0"], shares=routed["c0"])
    for bad in (
        {k: v for k, v in y.items() if k != "bias"},
        dict(y, bias=y["bias"].float()),
        dict(y, bias=y["bias"][:3]),
    ):
        with pytest.raises(MessageError):
            server.unmask_request({"c0": bad})


def test_client_steps_run_once_and_in_order() -> None:
    clients, server = make_parties()
    broadcast, routed = _through_shares(clients, server)
    c0 = clients["c0"]
    with pytest.raises(SecAggError, match="out of order"):
        c0.advertise_keys()
    with pytest.raises(SecAggError, match="out of order"):
        c0.unmask_reply(survivors=NAMES, dropped=[])
    inputs = make_inputs()
    c0.masked_input(*inputs["c0"], shares=routed["c0"])
    with pytest.raises(SecAggError, match="out of order"):  # a second input would leak x - x'
        c0.masked_input(*inputs["c0"], shares=routed["c0"])
    with pytest.raises(MessageError, match="both"):  # never both shares of one client
        c0.unmask_reply(survivors=NAMES, dropped=["c1"])
    with pytest.raises(MessageError, match="not listed as a survivor"):
        c0.unmask_reply(survivors=NAMES[1:], dropped=["c0"])
    with pytest.raises(MessageError, match="exactly the clients"):
        c0.unmask_reply(survivors=NAMES[:4], dropped=[])
    reply = c0.unmask_reply(survivors=NAMES[:4], dropped=["c4"])
    assert set(reply["self_shares"]) == set(NAMES[:4]) and set(reply["key_shares"]) == {"c4"}
    with pytest.raises(SecAggError, match="out of order"):
        c0.unmask_reply(survivors=NAMES, dropped=[])


def test_client_refuses_bad_own_input() -> None:
    clients, server = make_parties()
    _, routed = _through_shares(clients, server)
    x = {"a": torch.tensor([float("nan")])}
    with pytest.raises(SecAggError, match="NaN"):
        clients["c0"].masked_input(x, 1.0, shares=routed["c0"])
    with pytest.raises(SecAggError, match="weight"):
        clients["c0"].masked_input({"a": torch.zeros(1)}, -2.0, shares=routed["c0"])
    with pytest.raises(SecAggError, match="reserved"):
        clients["c0"].masked_input({WEIGHT_KEY: torch.zeros(1)}, 1.0, shares=routed["c0"])


def _json(value):
    return json.loads(json.dumps(value))


def test_every_message_survives_json_and_safetensors() -> None:
    """Plain data only: dicts of str go through JSON, masked tensors through safetensors."""
    clients, server = make_parties()
    adverts = {n: _json(c.advertise_keys()) for n, c in clients.items()}
    broadcast = _json(server.collect_keys(adverts))
    routed = _json(
        server.route_shares({n: _json(c.share_keys(broadcast)) for n, c in clients.items()})
    )
    inputs = make_inputs(3)
    masked = {
        n: load(save(c.masked_input(*inputs[n], shares=routed[n]))) for n, c in clients.items()
    }
    request = _json(server.unmask_request(masked))
    replies = {n: _json(clients[n].unmask_reply(**request)) for n in request["survivors"]}
    assert_close_to_sum(server.aggregate(replies), inputs, NAMES)
