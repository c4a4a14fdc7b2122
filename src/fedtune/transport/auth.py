"""Who is calling: addresses, token files, TLS credentials and the check run on every gRPC call."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import DeploymentError

CLIENT_KEY = "fedtune-client"      # metadata: the name the caller claims
TOKEN_KEY = "authorization"        # metadata: "Bearer <token>"
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_DUMMY = "x" * 43  # compared against when a name is unknown, so timing does not tell names apart


class CredentialsError(DeploymentError):
    """A TLS or token file is missing or malformed (names the file and what to do)."""


class AuthError(Exception):
    """A call's credentials are refused; the reason is logged, never sent to the caller."""


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raises ValueError naming what is wrong."""
    match = _ADDRESS.match(address.strip())
    if not match or int(match.group(2)) > 65535:
        raise ValueError(f"address {address!r} must look like HOST:PORT, e.g. 127.0.0.1:50051")
    return match.group(1), int(match.group(2))


def _read(path: str | Path, what: str, key: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise CredentialsError(
            f"{what} {path} (transport.{key}) cannot be read: {exc.strerror or exc}; make trial "
            "files with `fedtune certs DIR --clients ...`"
        ) from None


def load_tokens(path: str | Path) -> dict[str, str]:
    """Client name -> token, from JSON (`{"client_0": "..."}`) or `name token` lines (# comments)."""
    text = _read(path, "token file", "tokens").decode("utf-8", errors="replace")
    tokens: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CredentialsError(f"token file {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise CredentialsError(f"token file {path}: must map client names to token strings")
        items = list(data.items())
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise CredentialsError(f"token file {path}, line {number}: expected `name token`")
            items.append((parts[0], parts[1]))
    for name, token in items:
        if not CLIENT_NAME.match(name):
            raise CredentialsError(f"token file {path}: client name {name!r} is not a valid name")
        if len(token) < 16:
            raise CredentialsError(f"token file {path}: the token of '{name}' is shorter than 16 characters")
        if name in tokens:
            raise CredentialsError(f"token file {path}: client '{name}' appears twice")
        tokens[name] = token
    if not tokens:
        raise CredentialsError(f"token file {path} holds no tokens")
    return tokens


def client_token(path: str | Path, name: str) -> str:
    """A client's token: the file's only content, or its entry in a tokens file."""
    text = _read(path, "token file", "token_file").decode("utf-8", errors="replace").strip()
    if text and len(text.split()) == 1 and not text.startswith("{"):
        return text
    tokens = load_tokens(path)
    if name not in tokens:
        raise CredentialsError(f"token file {path} has no token for client '{name}'")
    return tokens[name]


def with_name(path: str | None, name: str) -> str | None:
    """Fill the `{name}` placeholder of a per-client path."""
    return None if path is None else path.replace("{name}", name)


def check_token_file_covers(tokens: Mapping[str, str], clients: Sequence[str], path: str) -> None:
    missing = [c for c in clients if c not in tokens]
    if missing:
        raise CredentialsError(
            f"token file {path} (transport.tokens) has no token for {', '.join(missing)}; "
            "every client of the federation needs one"
        )


@dataclass(frozen=True)
class Authenticator:
    """Checks a call's credentials; returns the caller's identity (a client name) or raises AuthError.

    With mutual TLS the identity is the certificate's common name; otherwise the claimed name.
    With tokens the token must be that identity's (constant-time comparison).
    """

    clients: Collection[str]
    tokens: Mapping[str, str] | None
    mutual_tls: bool

    def identify(self, metadata: Sequence[tuple[str, str | bytes]], cert_names: Sequence[str]) -> str:
        meta = _metadata(metadata)
        claimed = meta.get(CLIENT_KEY)
        if self.mutual_tls:
            if len(cert_names) != 1:
                raise AuthError("no client certificate common name")
            identity = cert_names[0]
            if claimed is not None and claimed != identity:
                raise AuthError(f"claims to be '{claimed[:40]}' but its certificate is '{identity}'")
        else:
            if not claimed:
                raise AuthError(f"no '{CLIENT_KEY}' metadata")
            identity = claimed
        self._check_token(meta, identity)
        if identity not in self.clients:
            raise AuthError(f"'{identity[:40]}' is not a client of this federation")
        return identity

    def check_token(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        """The cheap check run before a call takes a worker (no TLS context there): the claimed
        name's token. Returns the claimed name; `identify` still runs in the handler."""
        meta = _metadata(metadata)
        claimed = meta.get(CLIENT_KEY) or ""
        if self.tokens is None:  # mutual TLS only: the handshake already refused strangers
            return claimed
        if not claimed:
            raise AuthError(f"no '{CLIENT_KEY}' metadata")
        self._check_token(meta, claimed)
        return claimed

    def _check_token(self, meta: Mapping[str, str], identity: str) -> None:
        if self.tokens is None:
            return
        raw = meta.get(TOKEN_KEY, "")
        given = raw[7:] if raw.startswith("Bearer ") else ""
        expected = self.tokens.get(identity)
        ok = hmac.compare_digest(given.encode(), (expected or _DUMMY).encode())
        if expected is None:
            raise AuthError(f"unknown client '{identity[:40]}'")
        if not ok:
            raise AuthError(f"wrong or missing token for client '{identity[:40]}'")


def _metadata(metadata: Sequence[tuple[str, str | bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata:
        out[str(key).lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return out


def call_metadata(name: str, token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends on every call."""
    meta: list[tuple[str, str]] = [(CLIENT_KEY, name)]
    if token is not None:
        meta.append((TOKEN_KEY, f"Bearer {token}"))
    return tuple(meta)


def server_credentials(tls, mutual_tls: bool):
    """grpc server credentials from `transport.tls` (cert, key; ca when clients must show certs)."""
    import grpc

    for key in ("cert", "key"):
        if getattr(tls, key) is None:
            raise CredentialsError(f"the server needs transport.tls.{key}; make trial certificates "
                                   "with `fedtune certs DIR --clients ...`")
    pair = (_read(tls.key, "TLS key", "tls.key"), _read(tls.cert, "TLS certificate", "tls.cert"))
    if not mutual_tls:
        return grpc.ssl_server_credentials([pair])
    ca = _read(tls.ca, "CA certificate", "tls.ca")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls, mutual_tls: bool, name: str):
    """grpc channel credentials for client `name`: trust `tls.ca`; with mutual TLS, show its cert."""
    import grpc

    ca = _read(tls.ca, "CA certificate", "tls.ca")
    if not mutual_tls:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    key = _read(with_name(tls.client_key, name), "TLS key", "tls.client_key")
    cert = _read(with_name(tls.client_cert, name), "TLS certificate", "tls.client_cert")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
