"""Hostile values from a party with a valid token, through the real gRPC transport: each rejects
that message only; the run finishes, its summary and closing table are written, a resume works."""

from __future__ import annotations

import json
import threading
from io import StringIO
from pathlib import Path

import grpc
import pytest
import torch
from rich.console import Console

from fedtune.algorithms import build_strategy
from fedtune.config import load_recipe
from fedtune.runtime.deploy_client import _Loop
from fedtune.runtime.finish import finish_run
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import Simulation, resume_server
from fedtune.track.report import closing_table
from fedtune.track.rundir import RunDir
from fedtune.transport.auth import Authenticator, client_token, load_tokens, server_credentials
from fedtune.transport.certs import make_certs
from fedtune.transport.codec import decode, encode
from fedtune.transport.grpc_client import ServerConnection
from fedtune.transport.grpc_server import GrpcServerTransport
from fedtune.wire import Message, MessageKind

CLIENTS = ["client_0", "client_1"]
TAKEOVER = 1000.0  # what the hostile party adds to every adapter value if its update counted


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A tiny two-client recipe over TLS with tokens, and its model, built once."""
    root = tmp_path_factory.mktemp("hostile")
    make_certs(root / "certs", CLIENTS)
    certs = root / "certs"
    recipe = load_recipe({
        "seed": 5, "model": {"name": tiny_model_dir},
        "data": {"source": "synthetic", "synthetic": {"examples_per_category": 6}, "template": "compact",
                 "max_length": 96, "split": {"method": "iid"}, "test_fraction": 0.2, "val_fraction": 0.0},
        "adapter": {"r": 2}, "federation": {"clients": 2, "rounds": 2},
        "train": {"local_steps": 1, "batch_size": 2, "lr": 0.01},
        "eval": {"every": 1, "at_start": False, "max_new_tokens": 2},
        "transport": {"kind": "grpc", "address": "127.0.0.1:0", "round_timeout": 60, "join_timeout": 30,
                      "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem",
                              "key": f"{certs}/server.key"},
                      "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token",
                      "retry": {"initial_delay": 0.1, "max_delay": 0.5, "attempts": 50,
                                "give_up_after": 60}},
        "output": {"dir": str(root / "runs"), "progress": False, "checkpoint_every": 1},
    })
    return recipe, Simulation(recipe)


def _hostile(conn: ServerConnection, update_meta: dict, eval_meta: dict, stop_after_round: int | None):
    """client_1 answering FIT with a +TAKEOVER update and `update_meta`, EVALUATE with `eval_meta`."""
    def run():
        try:
            for data in conn.messages():
                msg = decode(data)
                if msg.kind == MessageKind.FINISH:
                    return
                if msg.kind == MessageKind.FIT:
                    tensors = {k: torch.full_like(v, TAKEOVER) for k, v in msg.tensors.items()}
                    reply = Message(MessageKind.UPDATE, msg.round, conn.name, "server", tensors=tensors,
                                    meta=update_meta)
                else:
                    reply = Message(MessageKind.EVAL_RESULT, msg.round, conn.name, "server", meta=eval_meta)
                conn.push(encode(reply), timeout=30)
                if stop_after_round is not None and msg.kind == MessageKind.EVALUATE \
                        and msg.round >= stop_after_round:
                    return
        except grpc.RpcError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _deployed_run(world, name: str, update_meta: dict, eval_meta: dict, *, rounds: int | None = None,
                  resume: RunDir | None = None):
    """The real Server on GrpcServerTransport; client_0 is the real deployed client loop."""
    recipe, sim = world
    if rounds is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.federation.rounds = rounds
    section = recipe.transport
    auth = Authenticator(CLIENTS, load_tokens(section.tokens), False)
    transport = GrpcServerTransport(section, CLIENTS, auth, credentials=server_credentials(section.tls, False))
    address = transport.start()
    conns = [ServerConnection(section, c, address=address,
                              token=client_token(section.token_file.replace("{name}", c), c)) for c in CLIENTS]
    out = StringIO()
    honest = threading.Thread(target=_Loop(conns[0], sim.clients["client_0"], recipe,
                                           Console(file=out, width=200)).run, daemon=True)
    honest.start()
    hostile = _hostile(conns[1], update_meta, eval_meta, None)
    try:
        assert transport.wait_for_clients(30) == CLIENTS
        run_dir = resume or RunDir.create(recipe.output.dir, name)
        initial = sim.setup.view.initial()
        server = Server(recipe, strategy=build_strategy("fedavg", {}, 2), transport=transport,
                        clients=CLIENTS, global_state={k: v.clone() for k, v in initial.items()},
                        run_dir=run_dir, reply_timeout=60)
        start = resume_server(server, run_dir, Console(file=StringIO())) if resume else 1
        result = server.run(start)
        summary = finish_run(sim.setup, run_dir, server, result)
        honest.join(30)
        hostile.join(30)
    finally:
        transport.close()
        for conn in conns:
            conn.close()
    return server, result, summary, run_dir, initial


def _no_takeover(result, initial):
    for name, value in result.global_state.items():
        assert float((value - initial[name]).abs().max()) < 1.0, name


@pytest.mark.parametrize("update_meta, reason", [
    ({"n_examples": 4, "metrics": {"train_loss": "much"}}, "train_loss must be a number"),
    ({"n_examples": 10**400, "metrics": {"train_loss": 1.0}}, "n_examples must be in"),
    ({"n_examples": 10**15, "metrics": {"train_loss": 1.0}}, "n_examples must be in"),  # a takeover
])
def test_a_hostile_update_is_rejected_and_the_run_finishes(world, update_meta, reason):
    eval_meta = {"n_examples": 3, "metrics": {"loss": "low", "perplexity": 2.0}}  # a string loss too
    server, result, summary, run_dir, initial = _deployed_run(world, f"u-{len(str(update_meta))}",
                                                             update_meta, eval_meta)
    assert result.rounds == 2
    _no_takeover(result, initial)  # the +1000 update never counted
    # 2 rounds × (1 update + 1 evaluation reply) of client_1 were rejected and counted
    assert summary["rejected_replies"] == 4 == server.rejected
    events = run_dir.events()
    rejected = [e for e in events if e["kind"] == "rejected"]
    assert len(rejected) == 4 and all(e["client"] == "client_1" for e in rejected)
    assert sum(reason in e["values"]["reason"] for e in rejected) == 2
    assert sum("metrics.loss must be a number" in e["values"]["reason"] for e in rejected) == 2
    assert [e["values"]["updates"] for e in events if e["kind"] == "round"] == [1, 1]
    assert "client_1" not in summary["per_client"] and "client_0" in summary["per_client"]
    assert json.loads((run_dir.path / "summary.json").read_text())["rounds"] == 2
    table = StringIO()
    Console(file=table, width=200).print(closing_table(summary))
    assert "client_0 test" in table.getvalue()


def test_resume_of_a_run_attacked_with_hostile_values_works(world):
    update_meta = {"n_examples": 10**400, "metrics": {"train_loss": "x"}}
    eval_meta = {"n_examples": 3, "metrics": {"loss": "low"}}
    _, first, _, run_dir, _ = _deployed_run(world, "resumed", update_meta, eval_meta, rounds=1)
    (run_dir.path / "summary.json").unlink()  # as if the server had stopped after round 1
    with run_dir.metrics_path.open("a") as f:  # what an older fedtune may have stored from a peer
        f.write(json.dumps({"round": 1, "client": "client_1", "kind": "fit", "time": 0.0,
                            "values": {"train_loss": "x", "n_examples": 10**400, "lr": [1]}}) + "\n")
        f.write(json.dumps({"round": 1, "client": "client_1", "kind": "eval",
                            "values": {"scope": "client", "loss": "low"}, "time": 0.0}) + "\n")
    server, result, summary, run_dir, initial = _deployed_run(world, "resumed", update_meta, eval_meta,
                                                             resume=run_dir)
    assert result.rounds == 2 and [e["round"] for e in run_dir.events() if e["kind"] == "round"] == [1, 2]
    assert summary["rejected_replies"] == 4  # 2 from the first start (checkpointed), 2 after the resume
    _no_takeover(result, initial)
    assert Path(summary["final_adapter"]).exists()
