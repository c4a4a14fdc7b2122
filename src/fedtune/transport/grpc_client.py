"""A deployed client's connection to the server: pull messages, push replies, back off and retry."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from fedtune.config import RetrySection, TransportSection
from fedtune.errors import DeploymentError, MessageError
from fedtune.transport.auth import call_metadata, channel_credentials
from fedtune.transport.framing import Reassembler, iter_frames
from fedtune.transport.grpc_server import (
    FETCH,
    FRAME_SLACK,
    HEARTBEAT_SECONDS,
    PULL,
    PUSH,
    grpc_options,
)

IDLE_SECONDS = 6 * HEARTBEAT_SECONDS  # no frame for this long: the stream is dead, reconnect
FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
BUSY_DETAIL = "Concurrent RPC limit exceeded"  # gRPC's own refusal when its call slots are full


def is_rejection(exc: grpc.RpcError) -> bool:
    """Whether the server refused a reply for what it is (retrying cannot help): INVALID_ARGUMENT
    (malformed, or too large for what the server expects) or a frame over gRPC's message limit.
    gRPC's own "Concurrent RPC limit exceeded" (RESOURCE_EXHAUSTED too) is transient: retry."""
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and BUSY_DETAIL not in (exc.details() or "")


class Backoff:
    """Exponential backoff with full jitter, bounded by attempts and by total time."""

    def __init__(self, retry: RetrySection, rng: random.Random | None = None):
        self.retry = retry
        self.rng = rng or random.Random()
        self.reset()

    def reset(self) -> None:
        self.failures = 0
        self.since = time.monotonic()

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when it is time to give up."""
        self.failures += 1
        elapsed = time.monotonic() - self.since
        if self.failures > self.retry.attempts or elapsed >= self.retry.give_up_after:
            return None
        cap = min(self.retry.max_delay, self.retry.initial_delay * 2 ** (self.failures - 1))
        delay = self.retry.initial_delay / 2 + self.rng.uniform(0, cap)
        return min(delay, max(0.0, self.retry.give_up_after - elapsed))


class _Watchdog:
    """Cancels a call when it stays idle too long while armed."""

    def __init__(self, call: grpc.Call, idle: float):
        self.call, self.idle = call, idle
        self.armed_at: float | None = None
        self.stopped = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="fedtune-watchdog").start()

    def _run(self) -> None:
        while not self.stopped.wait(0.5):
            armed = self.armed_at
            if armed is not None and time.monotonic() - armed > self.idle:
                self.call.cancel()
                return

    def stop(self) -> None:
        self.stopped.set()


class ServerConnection:
    """One client's channel to the server (TLS or insecure), with its credentials on every call."""

    def __init__(self, section: TransportSection, name: str, *, address: str, token: str | None):
        self.section = section
        self.name = name
        self.address = address
        self.metadata = call_metadata(name, token)
        options = grpc_options(section.chunk_bytes)
        if section.insecure:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            creds = channel_credentials(section.tls, section.mutual_tls, name)
            self.channel = grpc.secure_channel(address, creds, options=options)
        self._pull = self.channel.unary_stream(PULL, request_serializer=None, response_deserializer=None)
        self._push = self.channel.stream_unary(PUSH, request_serializer=None, response_deserializer=None)
        self._fetch = self.channel.unary_stream(FETCH, request_serializer=None, response_deserializer=None)
        self._ids = itertools.count(1)
        self.connected = False
        self.last_receive = (0, 0.0)  # bytes and seconds from first to last frame of the last message

    def messages(self, idle_seconds: float = IDLE_SECONDS) -> Iterator[bytes]:
        """Encoded messages from the server as they come; raises grpc.RpcError when the stream
        fails. `connected` turns true at the server's first frame (its welcome)."""
        self.connected = False
        call = self._pull(b"", metadata=self.metadata)
        watchdog = _Watchdog(call, idle_seconds)
        reassembler = Reassembler(self.section.max_message_bytes, self.section.chunk_bytes + FRAME_SLACK)
        frames = iter(call)
        try:
            while True:
                watchdog.armed_at = time.monotonic()
                try:
                    frame = next(frames)
                except StopIteration:
                    return
                watchdog.armed_at = None
                self.connected = True
                if not reassembler.in_progress:
                    first = time.perf_counter()
                data = reassembler.add(frame)
                if data is not None:
                    self.last_receive = (len(data), time.perf_counter() - first)
                    yield data
        finally:
            watchdog.stop()
            call.cancel()

    def push(self, data: bytes, timeout: float) -> str:
        """Upload one encoded reply; returns the server's verdict ('accepted' or 'late').

        A reply the server no longer awaits is refused before its bytes travel
        (FAILED_PRECONDITION, detail 'late: ...'): that is the verdict 'late' too."""
        frames = iter_frames([data], next(self._ids), self.section.chunk_bytes)
        try:
            answer = self._push(frames, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (exc.details() or "").startswith("late"):
                return "late"
            raise
        try:
            return str(json.loads(answer)["status"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"the server at {self.address} answered an upload with "
                                  "something unexpected") from None

    def fetch(self, resource: str, idle_seconds: float = IDLE_SECONDS,
              on_progress: Callable[[int, int], None] | None = None) -> bytes:
        """Download the encoded message `resource` (e.g. the offsite emulator) in one call; raises
        grpc.RpcError when the call fails, MessageError when the stream is malformed.
        `on_progress(received, total)` is called after every chunk."""
        call = self._fetch(json.dumps({"resource": resource}).encode(), metadata=self.metadata)
        watchdog = _Watchdog(call, idle_seconds)
        reassembler = Reassembler(self.section.max_message_bytes, self.section.chunk_bytes + FRAME_SLACK)
        try:
            watchdog.armed_at = time.monotonic()
            for frame in call:
                watchdog.armed_at = time.monotonic()
                data = reassembler.add(frame)
                if on_progress is not None:
                    on_progress(*(reassembler.received if data is None else (len(data), len(data))))
                if data is not None:
                    return data
            reassembler.finish()
            raise MessageError(f"the server ended the download of {resource} early")
        finally:
            watchdog.stop()
            call.cancel()

    def close(self) -> None:
        self.channel.close()
