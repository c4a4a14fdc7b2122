"""`fedtune certs`: secrets exist with mode 0600 from their first byte, in a 0700 directory."""

from __future__ import annotations

import os
import stat

import pytest

from fedtune.errors import DeploymentError
from fedtune.transport import certs

PRIVATE = {"ca.key", "server.key", "c0.key", "c1.key", "c0.token", "c1.token", "tokens.json"}
PUBLIC = {"ca.pem", "server.pem", "c0.pem", "c1.pem"}


def test_secrets_are_created_0600_with_no_window_even_under_a_loose_umask(tmp_path, monkeypatch):
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        opened.append((os.path.basename(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(certs.os, "open", spy_open)
    old = os.umask(0)  # a umask that narrows nothing: the mode given at creation is what counts
    try:
        certs.make_certs(tmp_path / "out", ["c0", "c1"])
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert {name for name, _, _ in opened} == PRIVATE | PUBLIC
    for name, flags, mode in opened:
        assert flags & os.O_CREAT and flags & os.O_EXCL, name  # created by this call, never reused
        assert mode == (0o600 if name in PRIVATE else 0o644), name
    for name in PRIVATE:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    for name in PUBLIC:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_an_existing_directory_is_narrowed_and_existing_files_are_never_overwritten(tmp_path):
    out = tmp_path / "shared"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)
    (out / "c0.token").write_text("keep me")
    with pytest.raises(DeploymentError, match=r"c0.token exists already"):
        certs.make_certs(out, ["c0"])
    assert (out / "c0.token").read_text() == "keep me"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
