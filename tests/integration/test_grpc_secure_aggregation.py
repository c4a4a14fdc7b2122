"""Secure aggregation over the real gRPC transport (TLS on loopback), clients as threads sharing one
simulated model: the same final adapter as the in-process run, every protocol step counted."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
from safetensors.torch import load_file

from fedtune.algorithms import build_strategy
from fedtune.config import load_recipe
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import Simulation
from fedtune.track.rundir import RunDir
from fedtune.transport.auth import Authenticator, client_token, load_tokens, server_credentials
from fedtune.transport.certs import make_certs
from fedtune.transport.framing import peek_header
from fedtune.transport.grpc_client import ServerConnection
from fedtune.transport.grpc_server import GrpcServerTransport

CLIENTS = ["client_0", "client_1", "client_2"]


def _serve_client(conn: ServerConnection, client, lock: threading.Lock, lose: set[str]) -> None:
    """A deployed client's loop in a thread; replies to the kinds in `lose` are never sent."""
    try:
        for data in conn.messages():
            kind = peek_header(data)["kind"]
            if kind == "finish":
                return
            with lock:  # the simulated clients share one model
                reply = client.handle_bytes(data)
            if reply is not None and kind not in lose:
                conn.push(reply, timeout=30)
    except grpc.RpcError:
        pass


def test_secure_rounds_over_grpc_equal_the_in_process_run_and_survive_a_dropout(tiny_recipe, tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs, CLIENTS)
    recipe = load_recipe(tiny_recipe(
        eval__every=0, eval__at_start=False, eval__clients=False,
        federation__secure_aggregation={"enabled": True},
        transport={"kind": "grpc", "address": "127.0.0.1:0", "round_timeout": 8,
                   "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem",
                           "key": f"{certs}/server.key"},
                   "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token"}))
    section = recipe.transport
    sim = Simulation(recipe)
    initial = {k: v.clone() for k, v in sim.slot.get().items()}
    for client in sim.clients.values():
        client.secagg.require(recipe.federation.secure_aggregation)

    transport = GrpcServerTransport(section, CLIENTS, Authenticator(CLIENTS, load_tokens(section.tokens), False),
                                    credentials=server_credentials(section.tls, False))
    address = transport.start()
    lock, threads, conns = threading.Lock(), [], []
    for name in CLIENTS:
        token = client_token(section.token_file.replace("{name}", name), name)
        conn = ServerConnection(section, name, address=address, token=token)
        lose = {"secagg_routed"} if name == "client_2" else set()  # drops before masking, every round
        thread = threading.Thread(target=_serve_client, args=(conn, sim.clients[name], lock, lose),
                                  daemon=True)
        thread.start()
        threads.append(thread)
        conns.append(conn)
    try:
        assert transport.wait_for_clients(30) == CLIENTS
        run_dir = RunDir.create(recipe.output.dir, "grpc", explicit=True)
        server = Server(recipe, strategy=build_strategy("fedavg", {}, 3), transport=transport,
                        clients=CLIENTS, global_state=initial, run_dir=run_dir, reply_timeout=8)
        result = server.run()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        transport.close()
        for conn in conns:
            conn.close()

    events = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    rounds = [e["values"] for e in events if e["kind"] == "round"]
    assert [r["secagg"]["dropped"] for r in rounds] == [["client_2"], ["client_2"]]
    assert result.missing == 2
    # Every step's bytes are counted, per round and per client (client_2 sent its keys and shares).
    assert sum(r["bytes_up"] for r in rounds) == transport.traffic.total("up")
    assert all(transport.traffic.by_client(r)["client_2"]["up"] > 0 for r in (1, 2))

    # The in-process run, client_2 dropping at the same step, ends with the same adapter: the
    # fixed-point sum is exact whatever the masks.
    for client in sim.clients.values():
        client.secagg.require(recipe.federation.secure_aggregation.model_copy(update={"enabled": False}))
    handle = sim.clients["client_2"].handle_bytes
    sim.clients["client_2"].handle_bytes = lambda data: (
        None if peek_header(data)["kind"] == "secagg_routed" else handle(data))
    sim.slot.set(initial)  # the shared model still holds the last client's local adapter
    local = RunDir.create(recipe.output.dir, "inprocess", explicit=True)
    summary = sim.run(local)
    last = sorted((Path(summary["final_adapter"]).parent / "checkpoints").glob("round_*"))[-1]
    expected = load_file(str(last / "global.safetensors"))
    assert expected.keys() == result.global_state.keys()
    for name, tensor in expected.items():
        assert bool((tensor - result.global_state[name]).abs().max() <= 1e-6), name
    assert any(float((expected[k] - initial[k]).abs().max()) > 1e-3 for k in expected)
