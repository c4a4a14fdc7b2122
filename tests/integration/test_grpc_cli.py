"""The deployment commands' errors (wrong recipe, nobody joining, no server, bad files), all
bounded in time; a party's own data file."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from fedtune.cli import main
from fedtune.config import load_recipe
from fedtune.errors import DataError
from fedtune.runtime.deploy_client import own_data
from fedtune.transport.certs import make_certs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tiny_recipe, tmp_path, **transport):
    certs = tmp_path / "certs"
    if not certs.exists():
        make_certs(certs, ["client_0", "client_1", "client_2"])
    base = {"kind": "grpc", "address": f"127.0.0.1:{_free_port()}",
            "tls": {"ca": f"{certs}/ca.pem", "cert": f"{certs}/server.pem", "key": f"{certs}/server.key"},
            "tokens": f"{certs}/tokens.json", "token_file": f"{certs}/{{name}}.token"}
    base.update(transport)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(transport=base)))
    return path


def test_certs_command_prints_a_recipe_section(tmp_path, capsys):
    assert main(["certs", str(tmp_path / "c"), "-n", "2", "--hostname", "fl.example.org"]) == 0
    out = capsys.readouterr().out
    assert "kind: grpc" in out and "{name}.token" in out
    assert (tmp_path / "c" / "client_1.token").exists() and not (tmp_path / "c" / "client_2.pem").exists()


def test_server_and_client_need_a_grpc_recipe(tiny_recipe, tmp_path, capsys):
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    assert main(["server", str(path)]) == 2
    assert "needs transport.kind: grpc" in capsys.readouterr().err
    assert main(["client", str(path), "--name", "client_0"]) == 2
    assert "needs transport.kind: grpc" in capsys.readouterr().err


def test_missing_credential_files_are_named_before_any_set_up(tiny_recipe, tmp_path, capsys):
    path = _recipe(tiny_recipe, tmp_path, tokens=str(tmp_path / "nope.json"))
    assert main(["server", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "transport.tokens" in err
    path = _recipe(tiny_recipe, tmp_path, tls={"ca": str(tmp_path / "missing-ca.pem")})
    assert main(["client", str(path), "--name", "client_0"]) == 2
    assert "missing-ca.pem" in capsys.readouterr().err


def test_resume_accepts_only_transport_overrides(tmp_path, capsys):
    assert main(["server", "--resume", str(tmp_path), "federation.rounds=9"]) == 2
    assert "only transport.* keys" in capsys.readouterr().err


def test_server_refuses_an_existing_run_name_and_says_how_to_resume_it(tiny_recipe, tmp_path, capsys):
    path = _recipe(tiny_recipe, tmp_path)
    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "recipe.yaml").write_text("name: x\n")
    assert main(["server", str(path), "output.name=taken"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"fedtune server --resume {taken}" in err and "fedtune run" not in err
    assert (taken / "recipe.yaml").read_text() == "name: x\n"  # nothing overwritten


def test_server_stops_when_no_client_joins_in_time(tiny_recipe, tmp_path, capsys):
    path = _recipe(tiny_recipe, tmp_path, join_timeout=1)
    start = time.monotonic()
    assert main(["server", str(path), "output.name=lonely"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "0 of 3 clients joined" in err and "client_0, client_1, client_2" in err
    assert not (tmp_path / "runs" / "lonely").exists()  # nothing left behind


def test_client_gives_up_when_no_server_answers(tiny_recipe, tmp_path, capsys):
    path = _recipe(tiny_recipe, tmp_path, retry={"initial_delay": 0.1, "max_delay": 0.3,
                                                 "give_up_after": 1.5})
    start = time.monotonic()
    assert main(["client", str(path), "--name", "client_1"]) == 2
    assert time.monotonic() - start < 30
    captured = capsys.readouterr()
    assert "retrying in" in captured.out
    assert "gave up reaching the server" in captured.err and "transport.retry" in captured.err


def test_a_partys_own_data_file_is_split_by_the_recipes_fractions(tmp_path):
    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "ab"[i % 2]}
            for i in range(40)]
    path = tmp_path / "ours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe({"data": {"source": "unused.jsonl", "test_fraction": 0.25, "val_fraction": 0.0}})
    data = own_data(recipe, "site_a", path)
    part = data.clients["site_a"]
    assert list(data.clients) == ["site_a"] and data.test == part.test
    assert (len(part.train), len(part.val), len(part.test)) == (30, 0, 10)
    assert {ex.category for ex in part.test} == {"a", "b"}  # stratified by category
    again = own_data(recipe, "site_a", path)
    assert [ex.instruction for ex in again.clients["site_a"].test] == [ex.instruction for ex in part.test]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match="no training examples left for client 'site_a'"):
        own_data(load_recipe({"data": {"test_fraction": 0.45, "val_fraction": 0.45}}), "site_a", path)
