"""Trial credentials: a self-signed CA, a server certificate, client certificates and tokens.

For trials and tests. Real federations should use certificates from the parties' own CA and
distribute each client only its own key and token.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import DeploymentError
from fedtune.transport.auth import CLIENT_NAME


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune trial"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Create `path` (never overwrite); a private file is 0600 from its creation, before any byte."""
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise DeploymentError(f"{path} exists already; `fedtune certs` never overwrites a file, "
                              "choose another directory") from None
    try:
        if private:
            os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _private_dir(out: Path) -> None:
    """The output directory, created 0700 (an existing one is narrowed to 0700: it holds keys)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.mkdir(mode=0o700)
    except FileExistsError:
        if not out.is_dir():
            raise DeploymentError(f"{out} exists and is not a directory") from None
    os.chmod(out, 0o700)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hostnames: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hostnames):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_certs(out_dir: str | Path, clients: Sequence[str], hostnames: Sequence[str] = (),
               days: int = 30) -> dict[str, Path]:
    """Write ca.pem (+ ca.key), server.pem/.key, <client>.pem/.key, <client>.token, tokens.json.

    The server certificate is valid for localhost, 127.0.0.1, ::1 and `hostnames`. Returns the
    paths by role. Refuses to overwrite an existing CA or any file. Keys and tokens are created
    with mode 0600 (no moment with a looser mode); the directory is made 0700.
    """
    out = Path(out_dir)
    bad = [c for c in clients if not CLIENT_NAME.match(c) or c == "server"]
    if bad or not clients:
        raise DeploymentError(f"client names {bad or '(none)'}: give names made of letters, digits, "
                              "'.', '_' or '-' (not 'server')")
    if (out / "ca.pem").exists():
        raise DeploymentError(f"{out} already holds a CA (ca.pem); choose another directory")
    _private_dir(out)

    ca_key = _key()
    ca_name = _name("fedtune trial CA")
    ca = (_builder("fedtune trial CA", ca_name, ca_key.public_key(), days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.pem", _pem(ca))
    _write(out / "ca.key", _pem_key(ca_key), private=True)

    def issue(common_name: str, usage, san: x509.SubjectAlternativeName | None) -> None:
        key = _key()
        builder = (_builder(common_name, ca_name, key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(out / f"{common_name}.pem", _pem(cert))
        _write(out / f"{common_name}.key", _pem_key(key), private=True)

    issue("server", ExtendedKeyUsageOID.SERVER_AUTH,
          _san(["localhost", "127.0.0.1", "::1", *hostnames]))
    tokens = {}
    for client in clients:
        issue(client, ExtendedKeyUsageOID.CLIENT_AUTH, _san([client]))
        tokens[client] = secrets.token_urlsafe(32)
        _write(out / f"{client}.token", (tokens[client] + "\n").encode(), private=True)
    _write(out / "tokens.json", (json.dumps(tokens, indent=2) + "\n").encode(), private=True)
    return {"ca": out / "ca.pem", "server_cert": out / "server.pem", "server_key": out / "server.key",
            "tokens": out / "tokens.json", "dir": out}


def recipe_snippet(out_dir: str | Path, address: str = "127.0.0.1:50051") -> str:
    """The `transport` section that uses what `make_certs` wrote."""
    d = Path(out_dir).resolve()
    return (
        "transport:\n"
        "  kind: grpc\n"
        f"  address: {address}\n"
        "  tls:\n"
        f"    ca: {d}/ca.pem\n"
        f"    cert: {d}/server.pem          # server only\n"
        f"    key: {d}/server.key           # server only\n"
        f"    client_cert: {d}/{{name}}.pem  # clients, with mutual_tls: true\n"
        f"    client_key: {d}/{{name}}.key\n"
        f"  tokens: {d}/tokens.json       # server only\n"
        f"  token_file: {d}/{{name}}.token  # clients\n"
    )
