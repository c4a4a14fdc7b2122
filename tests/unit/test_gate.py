"""Admission before a worker slot: token check, refusal budget, per-address summaries; the
client's reading of status codes; transport counts that survive a resume."""

from __future__ import annotations

import logging

import grpc
import pytest

from fedtune.transport.auth import Authenticator, AuthError, call_metadata
from fedtune.transport.gate import SHED, Gate, RefusalLog, TokenBucket, peer_address
from fedtune.transport.grpc_client import is_rejection
from fedtune.transport.mailbox import Counts

TOKENS = {"client_0": "a" * 20, "client_1": "b" * 20}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_its_burst_then_its_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one more token after half a second at 2 per second
    assert [bucket.take() for _ in range(2)] == [True, False]


def test_refusal_log_logs_the_first_then_one_summary_per_address_and_interval(caplog):
    clock = Clock()
    refusals = RefusalLog(interval=10.0, per_address=5, clock=clock)
    caplog.set_level(logging.WARNING, logger="fedtune.transport")
    for _ in range(1000):
        refusals.refused("10.0.0.1", "Pull: wrong token")
    refusals.refused("10.0.0.2", "Push: unknown client 'x'")
    assert len(caplog.records) == 2  # 1,001 refusals, two lines: the first of each address
    assert refusals.limited("10.0.0.1") and not refusals.limited("10.0.0.2")
    clock.now += 10.0
    refusals.refused("10.0.0.1", "Pull: wrong token")  # a new interval: the summary of the last
    assert caplog.records[2].getMessage() == "refused 999 calls from 10.0.0.1 in 10 s: 999 x Pull: wrong token"
    assert not refusals.limited("10.0.0.1")
    refusals.flush()
    assert caplog.records[3].getMessage() == "refused 1 calls from 10.0.0.1 in 0 s: 1 x Pull: wrong token"
    assert refusals.total == 1002


def test_the_gate_admits_right_tokens_refuses_within_budget_and_sheds_beyond():
    auth = Authenticator(list(TOKENS), TOKENS, mutual_tls=False)
    clock = Clock()
    shed = []
    handler = grpc.unary_stream_rpc_method_handler(lambda r, c: iter(()))
    made = []

    def refusal(reason):
        made.append(reason)
        return "refusal handler"

    gate = Gate(auth.check_token, {"/fedtune.Federation/Pull": (handler, refusal)},
                RefusalLog(clock=clock), TokenBucket(1.0, 2, clock=clock), on_shed=lambda: shed.append(1))

    class Details:
        def __init__(self, method, meta):
            self.method, self.invocation_metadata = method, meta

    good = Details("/fedtune.Federation/Pull", call_metadata("client_1", "b" * 20))
    bad = Details("/fedtune.Federation/Pull", call_metadata("client_1", "a" * 20))
    assert gate.service(good) is handler
    assert gate.service(Details("/other/Method", good.invocation_metadata)) is None
    assert [gate.service(bad) for _ in range(3)] == ["refusal handler", "refusal handler", None]
    assert made == ["Pull: wrong or missing token for client 'client_1'"] * 2 and len(shed) == 1
    assert gate.service(good) is handler  # a right token is admitted whatever the budget


def test_check_token_is_the_identify_token_rule_and_mutual_tls_defers_to_the_handler():
    auth = Authenticator(list(TOKENS), TOKENS, mutual_tls=False)
    assert auth.check_token(call_metadata("client_0", "a" * 20)) == "client_0"
    for meta, reason in [((), "no 'fedtune-client'"), (call_metadata("client_9", "a" * 20), "unknown client"),
                         (call_metadata("client_0", None), "wrong or missing token")]:
        with pytest.raises(AuthError, match=reason):
            auth.check_token(meta)
    assert Authenticator(list(TOKENS), None, mutual_tls=True).check_token(()) == ""


@pytest.mark.parametrize(("code", "details", "rejected"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "too large: a message of 9 bytes", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 8)", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", False),  # busy: retry
    (grpc.StatusCode.UNAVAILABLE, "connection reset", False),
    (grpc.StatusCode.ABORTED, "another upload of this client is in progress", False),
])
def test_the_client_retries_busy_and_gives_up_only_on_rejections(code, details, rejected):
    class Error(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return details

    assert is_rejection(Error()) is rejected


def test_counts_round_trip_and_ignore_malformed_values(caplog):
    counts = Counts(late=2, refused=1500, shed=9)
    restored = Counts()
    restored.load_state({**counts.state(), "rejected": "many", "bogus": 3, "dropped": 10**400})
    assert restored == Counts(late=2, refused=1500, shed=9)
    assert "ignored the transport count 'rejected'" in caplog.text
    restored.load_state(["not", "a", "dict"])
    assert restored.refused == 1500
    assert peer_address("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5555") == "[::1]" and SHED.startswith("(")


def test_transport_counts_are_checkpointed_and_restored_on_resume(tmp_path):
    import torch

    from fedtune.algorithms import build_strategy
    from fedtune.config import load_recipe
    from fedtune.runtime.server import Server
    from fedtune.track.rundir import RunDir
    from fedtune.transport.grpc_server import GrpcServerTransport

    recipe = load_recipe({"federation": {"clients": 2}, "transport": {
        "kind": "grpc", "insecure": True, "tokens": "t.json", "token_file": "t.token"}})
    run_dir = RunDir.create(tmp_path, "run")

    def server():
        transport = GrpcServerTransport(recipe.transport, list(TOKENS),
                                        Authenticator(list(TOKENS), TOKENS, False), credentials=None)
        made = Server(recipe, strategy=build_strategy("fedavg", {}, 2), transport=transport,
                      clients=list(TOKENS), global_state={"w": torch.zeros(2)}, run_dir=run_dir)
        made._wall = lambda: 0.0
        return made, transport

    first, transport = server()
    transport.mailbox.counts.refused, transport.mailbox.counts.late = 1234, 5
    first.checkpoint(1)
    second, transport = server()
    assert second.restore(run_dir.latest_checkpoint()) == 2
    assert transport.stats()["refused_calls"] == 1234 and transport.stats()["late_replies"] == 5
