"""A hub id that cannot be fetched fails in seconds, saying how to work offline."""

from __future__ import annotations

import socket
import time

import pytest

from fedtune.cli import main
from fedtune.config import ModelSection
from fedtune.errors import ModelError
from fedtune.models import hub
from fedtune.models.hub import hub_access

MISSING = "fedtune-tests/no-such-model-7f3a"


@pytest.fixture(autouse=True)
def online_and_fresh(monkeypatch):
    """Online mode (whatever the environment says) and no answers remembered from other tests."""
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "_ANSWERS", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False, raising=False)


@pytest.fixture
def closed_endpoint(monkeypatch):
    """The hub's address is a local port nobody listens on: the hub cannot be reached."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return port


def test_an_unknown_hub_id_fails_fast_with_the_offline_hint(monkeypatch):
    # Whether or not this machine has network: no such repository, or no hub at all.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        hub_access(ModelSection(name=MISSING))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"model.name {MISSING!r}" in message
    assert "HF_HUB_OFFLINE=1" in message and "local directory" in message


def test_an_unreachable_hub_is_named_as_such(closed_endpoint, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"the Hugging Face hub cannot be reached .* no copy of this "
                                         r"model is cached .*HF_HUB_OFFLINE=1"):
        hub_access(ModelSection(name=MISSING))
    assert time.monotonic() - start < 10


def test_an_unreachable_hub_with_a_cached_copy_uses_it(closed_endpoint, monkeypatch):
    cached = {}

    def fake_cache(repo_id, filename, revision=None):
        cached["asked"] = (repo_id, filename, revision)
        return "/cache/models--org--name/snapshots/abc/config.json"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache)
    assert hub_access(ModelSection(name="org/name", revision="v1")) == {"local_files_only": True}
    assert cached["asked"] == ("org/name", "config.json", "v1")


def test_offline_mode_never_asks_the_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    monkeypatch.setattr(hub, "_ask_hub", lambda *a: pytest.fail("asked the hub while offline"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set and no copy of this model is cached"):
        hub_access(ModelSection(name=MISSING))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/c/config.json")
    assert hub_access(ModelSection(name="org/cached")) == {}


def test_built_in_models_and_directories_are_not_looked_up(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_ask_hub", lambda *a: pytest.fail("asked the hub"))
    assert hub_access(ModelSection(name="builtin:tiny")) == {}
    assert hub_access(ModelSection(name=str(tmp_path))) == {}
    with pytest.raises(ModelError, match="no such directory"):
        hub_access(ModelSection(name=str(tmp_path / "not-here")))


def test_the_command_fails_before_loading_anything(closed_endpoint, tmp_path, capsys):
    start = time.monotonic()
    assert main(["run", "default", f"model.name={MISSING}", f"output.dir={tmp_path}"]) == 2
    assert time.monotonic() - start < 10
    err = " ".join(capsys.readouterr().err.split())
    assert "the Hugging Face hub cannot be reached" in err and "HF_HUB_OFFLINE=1" in err
    assert not any(tmp_path.iterdir())  # no run directory
