"""A deployed client's per-round line shows its notes ([rejected], [late], [not sent]) verbatim."""

from __future__ import annotations

from io import StringIO

import grpc
import pytest

from fedtune.config import load_recipe
from fedtune.runtime.deploy_client import _Loop
from fedtune.track.reporter import plain_console
from fedtune.transport.codec import encode
from fedtune.wire import Message, MessageKind


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "[bold]no[/bold]"


class _Connection:
    """Answers every push with `verdict`, or raises a refusal with its status code."""

    def __init__(self, verdict):
        self.verdict, self.pushes = verdict, 0

    def push(self, reply: bytes, timeout: float) -> str:
        self.pushes += 1
        if isinstance(self.verdict, grpc.StatusCode):
            raise _Refused(self.verdict)
        return self.verdict


class _Client:
    name = "client_0"
    rejected = 0

    def handle_bytes(self, data: bytes) -> bytes:
        return encode(Message(MessageKind.UPDATE, 3, "client_0", "server",
                              meta={"n_examples": 4, "metrics": {"train_loss": 0.5}}))


@pytest.mark.parametrize("verdict, note", [
    ("late", "[late]"),
    (grpc.StatusCode.INVALID_ARGUMENT, "[rejected]"),
    (grpc.StatusCode.UNAVAILABLE, "[not sent]"),
    ("accepted", None),
])
def test_the_note_of_a_reply_appears_in_the_console_line(verdict, note):
    recipe = load_recipe({"transport": {"retry": {"initial_delay": 0.001, "max_delay": 0.001}}})
    out = StringIO()
    loop = _Loop(_Connection(verdict), _Client(), recipe, plain_console(file=out, width=300))
    fit = encode(Message(MessageKind.FIT, 3, "server", "client_0", meta={"lr": 0.1}))
    assert loop._handle(fit) is False
    line = out.getvalue()
    assert "client_0: round    3 trained: train loss 0.5000" in line
    if note is None:
        assert "[" not in line
    else:
        assert line.rstrip().endswith(note), line


def test_a_header_the_client_cannot_read_is_rejected_not_fatal():
    recipe = load_recipe({})
    out = StringIO()
    loop = _Loop(_Connection("accepted"), _Client(), recipe, plain_console(file=out, width=300))
    assert loop._handle(b"garbage, not a message") is False
    assert "a message from the server was rejected" in out.getvalue()
    assert loop.client.rejected == 1
