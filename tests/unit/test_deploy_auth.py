"""Credentials: token files, the per-call identity check, trial certificates, the transport recipe."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedtune.config import load_recipe
from fedtune.errors import DeploymentError, RecipeError
from fedtune.transport.auth import (
    Authenticator,
    AuthError,
    CredentialsError,
    call_metadata,
    check_token_file_covers,
    client_token,
    load_tokens,
    parse_address,
    with_name,
)
from fedtune.transport.certs import make_certs

TOKEN_A = "a" * 20
TOKEN_B = "b" * 20


def test_token_files_as_json_or_lines(tmp_path):
    js = tmp_path / "tokens.json"
    js.write_text(json.dumps({"client_0": TOKEN_A, "client_1": TOKEN_B}))
    lines = tmp_path / "tokens.txt"
    lines.write_text(f"# comment\nclient_0 {TOKEN_A}\n\nclient_1 {TOKEN_B}  # trailing\n")
    assert load_tokens(js) == load_tokens(lines) == {"client_0": TOKEN_A, "client_1": TOKEN_B}
    single = tmp_path / "client_1.token"
    single.write_text(TOKEN_B + "\n")
    assert client_token(single, "client_1") == TOKEN_B
    assert client_token(lines, "client_1") == TOKEN_B
    with pytest.raises(CredentialsError, match="no token for client 'client_9'"):
        client_token(lines, "client_9")
    with pytest.raises(CredentialsError, match=r"no token for client_2"):
        check_token_file_covers(load_tokens(js), ["client_0", "client_2"], str(js))


@pytest.mark.parametrize("text, reason", [
    ("client_0 short\n", "shorter than 16"),
    (f"client_0 {TOKEN_A} extra\n", "line 1: expected `name token`"),
    (f"client_0 {TOKEN_A}\nclient_0 {TOKEN_B}\n", "appears twice"),
    ('{"client_0": 5}', "must map client names"),
    ("{not json", "not valid JSON"),
    ("# nothing\n", "holds no tokens"),
    (f"bad/name {TOKEN_A}\n", "not a valid name"),
])
def test_bad_token_files_name_the_file_and_problem(tmp_path, text, reason):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(CredentialsError, match=reason) as info:
        load_tokens(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_recipe_key_and_fedtune_certs(tmp_path):
    with pytest.raises(CredentialsError, match=r"transport.tokens.*fedtune certs"):
        load_tokens(tmp_path / "nope.json")


def test_authenticator_with_tokens():
    auth = Authenticator(clients=["client_0", "client_1"], tokens={"client_0": TOKEN_A,
                                                                    "client_1": TOKEN_B}, mutual_tls=False)
    assert auth.identify(call_metadata("client_0", TOKEN_A), []) == "client_0"
    assert auth.identify([(k.upper(), v.encode()) for k, v in call_metadata("client_1", TOKEN_B)], []) == "client_1"
    for metadata, reason in [
        (call_metadata("client_0", TOKEN_B), "wrong or missing token for client 'client_0'"),
        (call_metadata("client_0", None), "wrong or missing token"),
        (call_metadata("client_7", TOKEN_A), "unknown client 'client_7'"),
        ([("authorization", f"Bearer {TOKEN_A}")], "no 'fedtune-client' metadata"),
        ([("fedtune-client", "client_0"), ("authorization", TOKEN_A)], "wrong or missing token"),
    ]:
        with pytest.raises(AuthError, match=reason):
            auth.identify(metadata, [])


def test_authenticator_with_mutual_tls_uses_the_certificate_name():
    auth = Authenticator(clients=["client_0", "client_1"], tokens=None, mutual_tls=True)
    assert auth.identify(call_metadata("client_0", None), ["client_0"]) == "client_0"
    assert auth.identify([], ["client_1"]) == "client_1"
    with pytest.raises(AuthError, match="claims to be 'client_1' but its certificate is 'client_0'"):
        auth.identify(call_metadata("client_1", None), ["client_0"])
    with pytest.raises(AuthError, match="no client certificate"):
        auth.identify(call_metadata("client_0", None), [])
    with pytest.raises(AuthError, match="not a client of this federation"):
        auth.identify([], ["client_5"])
    both = Authenticator(clients=["client_0"], tokens={"client_0": TOKEN_A}, mutual_tls=True)
    assert both.identify(call_metadata("client_0", TOKEN_A), ["client_0"]) == "client_0"
    with pytest.raises(AuthError, match="wrong or missing token"):
        both.identify(call_metadata("client_0", TOKEN_B), ["client_0"])


def test_addresses_and_name_placeholders():
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:8443") == ("[::1]", 8443)
    assert parse_address("fl.example.org:443") == ("fl.example.org", 443)
    for bad in ("127.0.0.1", "host:99999", "http://x:1", "a b:1"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)
    assert with_name("certs/{name}.pem", "client_2") == "certs/client_2.pem"
    assert with_name(None, "x") is None


def test_trial_certificates(tmp_path):
    paths = make_certs(tmp_path / "c", ["client_0", "site-b"], hostnames=["fl.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    client = x509.load_pem_x509_certificate((tmp_path / "c" / "site-b.pem").read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-b"
    tokens = load_tokens(paths["tokens"])
    assert set(tokens) == {"client_0", "site-b"} and len(set(tokens.values())) == 2
    assert client_token(tmp_path / "c" / "client_0.token", "client_0") == tokens["client_0"]
    for private in ("ca.key", "server.key", "client_0.key", "tokens.json", "client_0.token"):
        assert stat.S_IMODE((tmp_path / "c" / private).stat().st_mode) == 0o600, private
    with pytest.raises(DeploymentError, match="already holds a CA"):
        make_certs(tmp_path / "c", ["client_0"])
    with pytest.raises(DeploymentError, match="client names"):
        make_certs(tmp_path / "d", ["server"])


def _grpc(**transport):
    return {"federation": {"clients": 3}, "transport": {"kind": "grpc", **transport}}


def test_transport_recipe_validation():
    ok = load_recipe(_grpc(tls={"ca": "ca.pem"}, tokens="t.json", min_replies=2))
    assert ok.transport.address == "127.0.0.1:50051" and ok.transport.chunk_bytes == 4 * 1024**2
    assert load_recipe(_grpc(insecure=True, token_file="t")).transport.insecure
    assert load_recipe(_grpc(tls={"ca": "c", "client_cert": "{name}.pem", "client_key": "{name}.key"},
                             mutual_tls=True)).transport.mutual_tls
    # The in-process default needs none of it.
    assert load_recipe({}).transport.kind == "inprocess"
    for transport, reason in [
        ({"tokens": "t.json"}, r"transport.tls.ca.*fedtune certs"),
        ({"tls": {"ca": "c"}}, r"client credentials.*tokens"),
        ({"insecure": True, "mutual_tls": True, "tokens": "t"}, "cannot be combined with insecure"),
        ({"tls": {"ca": "c"}, "mutual_tls": True}, "client_cert and client_key"),
        ({"insecure": True, "tokens": "t", "address": "nowhere"}, "HOST:PORT"),
        ({"insecure": True, "tokens": "t", "chunk_bytes": 10}, "chunk_bytes"),
        ({"insecure": True, "tokens": "t", "min_replies": 4}, r"min_replies \(4\) is more than"),
        ({"insecure": True, "tokens": "t", "retry": {"attemps": 3}}, "transport.retry.attemps: unknown key"),
    ]:
        with pytest.raises(RecipeError, match=reason):
            load_recipe(_grpc(**transport))
