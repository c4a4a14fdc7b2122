"""The gRPC server transport: clients dial in, pull their messages and push their replies.

Three methods on raw bytes (no protobuf): `Pull` (server-streaming) streams the frames of a
client's outbox, with a ping when idle; `Push` (client-streaming) uploads one reply in frames;
`Fetch` (server-streaming) sends a named download a client needs before it joins (the offsite
emulator), counted as its round-0 traffic.
Every call is authenticated first; every reply is reassembled under the size its pending request
allows (transport/upload.py: refused at the first frame when larger, at its index when it names
other tensors), decoded in place and matched to its sender's identity and a pending request
before the Server sees it. A bad call is refused and counted; the others go on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import grpc

from fedtune.config import TransportSection
from fedtune.errors import DeploymentError, MessageError
from fedtune.transport.auth import Authenticator, AuthError
from fedtune.transport.base import TrafficCounter
from fedtune.transport.codec import TensorSpec
from fedtune.transport.framing import (
    FrameError,
    Reassembler,
    SharedEncoder,
    is_last,
    iter_frames,
    ping_frame,
)
from fedtune.transport.gate import Gate, RefusalLog, TokenBucket, peer_address
from fedtune.transport.mailbox import CLOSED, Mailbox, Outgoing
from fedtune.transport.upload import SERVER_NAME as SERVER_NAME  # re-exported for clients
from fedtune.transport.upload import LateUpload, Upload
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.transport")

SERVICE = "fedtune.Federation"
PULL = f"/{SERVICE}/Pull"
PUSH = f"/{SERVICE}/Push"
FETCH = f"/{SERVICE}/Fetch"
HEARTBEAT_SECONDS = 5.0
FRAME_SLACK = 64 * 1024  # room for a frame header above chunk_bytes in gRPC's message limit
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
REFUSAL_SLOTS = 4  # worker slots refusals of strangers may take at once (burst of the budget)
REFUSALS_PER_SECOND = 50.0  # refusals answered UNAUTHENTICATED on a worker; beyond, shed unread
REFUSAL_LOG_SECONDS = 10.0  # one summary line per address and interval


def return_large_buffers_to_os() -> None:
    """Make glibc serve every buffer of 128 KiB or more (frames, uploads) by mmap, returned to the
    OS when freed. By default glibc raises that threshold after the first large free, after which
    refused and finished uploads stay in the heap: measured, three concurrent refused 300 MB
    uploads kept the server ~30 MiB higher (benchmarks/hostile.py). No-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # a fixed threshold: no dynamic raising
    except (OSError, AttributeError):
        pass


def grpc_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by both sides: small messages (frames), keepalive pings."""
    limit = chunk_bytes + FRAME_SLACK
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class GrpcServerTransport:
    """A ServerTransport over gRPC; `start()` binds, `wait_for_clients()` waits for them to dial in."""

    def __init__(
        self,
        section: TransportSection,
        clients: Collection[str],
        authenticator: Authenticator,
        *,
        credentials: grpc.ServerCredentials | None,
        address: str | None = None,
        on_reply: Callable[[str], None] | None = None,
        downloads: Mapping[str, Callable[[str], Message]] | None = None,
    ):
        """`downloads`: resource name -> the message for a given client (`Fetch`)."""
        self.section = section
        self.clients = list(clients)
        self.auth = authenticator
        self.credentials = credentials
        self.address = address or section.address
        self.traffic = TrafficCounter()
        self.mailbox = Mailbox(self.clients, self.traffic, on_reply=on_reply)
        self.encoder = SharedEncoder()
        self.max_chunk = section.chunk_bytes + FRAME_SLACK
        self.last_upload = (0, 0.0)  # bytes and seconds from first to last frame of the last upload
        self.downloads = dict(downloads or {})
        self._download_encoder = SharedEncoder()  # one copy of a download's tensors for all clients
        self._download_lock = threading.Lock()
        self._downloaded: set[str] = set()
        self.refusals = RefusalLog(REFUSAL_LOG_SECONDS)
        self._server: grpc.Server | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> str:
        """Bind and serve; returns the bound address (the port filled in when 0 was asked)."""
        return_large_buffers_to_os()
        # Slots for the parties' own calls (a stream, an upload and a download each, and a
        # reconnecting stream), plus a few for cheap refusals; strangers are kept out of them by
        # the gate, which refuses a wrong token before a call takes a slot (transport/gate.py).
        workers = 3 * len(self.clients) + REFUSAL_SLOTS + 8
        gate = Gate(self.auth.check_token, {
            PULL: (grpc.unary_stream_rpc_method_handler(self._pull), self._refusal(streaming_request=False)),
            PUSH: (grpc.stream_unary_rpc_method_handler(self._push), self._refusal(streaming_request=True)),
            FETCH: (grpc.unary_stream_rpc_method_handler(self._fetch), self._refusal(streaming_request=False)),
        }, self.refusals, TokenBucket(REFUSALS_PER_SECOND, REFUSAL_SLOTS), on_shed=self._shed)
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedtune-grpc"),
            handlers=[gate],
            options=[*grpc_options(self.section.chunk_bytes), ("grpc.so_reuseport", 0),
                     ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000)],
            maximum_concurrent_rpcs=workers,
        )
        try:
            if self.credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self.credentials)
        except RuntimeError as exc:
            raise DeploymentError(f"cannot listen on {self.address} (transport.address): {exc}") from None
        if not port:
            raise DeploymentError(f"cannot listen on {self.address} (transport.address); is it in use?")
        server.start()
        self._server = server
        host = self.address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        if self.credentials is None:
            log.warning("transport.insecure is true: traffic to %s is NOT encrypted; tokens and "
                        "adapters can be read and altered on the network", self.address)
        return self.address

    def wait_for_clients(self, timeout: float) -> list[str]:
        return self.mailbox.wait_for_clients(timeout)

    def close(self) -> None:
        self.mailbox.close()
        if self._server is not None:
            self._server.stop(grace=2.0).wait(5.0)
            self._server = None
        self.refusals.flush()

    def stats(self) -> dict[str, int]:
        c = self.mailbox.counts
        return {"late_replies": c.late, "late_bytes": c.late_bytes, "rejected_messages": c.rejected,
                "refused_calls": c.refused, "shed_calls": c.shed, "dropped_messages": c.dropped,
                "rejoins": c.rejoined}

    def counter_state(self) -> dict[str, int]:
        """The counts behind `stats()`, for a checkpoint (a resumed server continues them)."""
        return self.mailbox.counts.state()

    def load_counter_state(self, state: object) -> None:
        self.mailbox.counts.load_state(state)

    # -- ServerTransport ------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        if not self.mailbox.knows(message.receiver):
            raise MessageError(f"receiver '{message.receiver}' is not a known client")
        head, body = self.encoder.encode(message)
        self.mailbox.put(message.receiver, message.round, message.kind, head, body)

    def expect(self, round: int, answer: MessageKind, clients: Collection[str],
               specs: Mapping[str, TensorSpec] | None) -> None:
        """Replies of `answer` kind from `clients` in `round` must carry exactly `specs`: larger
        uploads are refused at their first frame, other tensor names before their bytes arrive."""
        self.mailbox.expect(round, answer, clients, None if specs is None else dict(specs))

    def collect(self, round: int, expected: Collection[str], timeout: float | None = None) -> list[Message]:
        return list(self.collect_each(round, expected, timeout))

    def collect_each(self, round: int, expected: Collection[str],
                     timeout: float | None = None) -> Iterator[Message]:
        self.encoder.clear()
        yield from self.mailbox.collect_each(round, expected,
                                             self.section.round_timeout if timeout is None else timeout)

    # -- handlers -------------------------------------------------------------------------------

    def _refusal(self, *, streaming_request: bool) -> Callable[[str], grpc.RpcMethodHandler]:
        """A handler that refuses a call whose token the gate refused (it runs on a worker only
        while the refusal budget allows; it logs through the per-address summary)."""
        def make(reason: str) -> grpc.RpcMethodHandler:
            def refuse(request: object, context: grpc.ServicerContext) -> None:
                self._refused(context, reason)
            if streaming_request:
                return grpc.stream_unary_rpc_method_handler(refuse)
            return grpc.unary_stream_rpc_method_handler(refuse)
        return make

    def _refused(self, context: grpc.ServicerContext, reason: str) -> None:
        self.mailbox.count("refused")
        address = peer_address(context.peer())
        limited = self.refusals.limited(address)
        self.refusals.refused(address, "over the per-address limit of refused calls" if limited else reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "credentials refused")

    def _shed(self) -> None:
        self.mailbox.count("refused")
        self.mailbox.count("shed")

    def _authenticate(self, context: grpc.ServicerContext, method: str) -> str:
        try:
            names = context.auth_context().get("x509_common_name", [])
            cert_names = [n.decode("utf-8", "replace") for n in names]
            return self.auth.identify(context.invocation_metadata() or (), cert_names)
        except AuthError as exc:
            self._refused(context, f"{method}: {exc}")
            raise  # not reached: abort raises

    def _pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        client = self._authenticate(context, "Pull")
        session = self.mailbox.connect(client)
        context.add_callback(lambda: self.mailbox.disconnect(client, session))
        try:
            yield ping_frame()  # tells the client it is connected
            while context.is_active():
                item = self.mailbox.next_for(client, session, HEARTBEAT_SECONDS)
                if item is CLOSED:
                    return
                if item is None:
                    yield ping_frame()
                    continue
                assert isinstance(item, Outgoing)
                done = False
                try:
                    for frame in iter_frames((item.head, item.body), item.id, self.section.chunk_bytes):
                        if is_last(frame):  # handed to gRPC in full: sent (the code after a
                            done = True     # generator's last yield may never run)
                            self.mailbox.delivered(client, session, item)
                        yield frame
                finally:
                    if not done:
                        self.mailbox.interrupted(client, session, item)
                del item, frame  # do not hold the message while waiting for the next one
        finally:
            self.mailbox.disconnect(client, session)

    def _fetch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        client = self._authenticate(context, "Fetch")
        try:
            name = json.loads(request)["resource"] if len(request) <= 1024 else None
        except (ValueError, KeyError, TypeError):
            name = None
        make = self.downloads.get(name) if isinstance(name, str) else None
        if make is None:
            self.mailbox.count("refused")
            log.warning("refused a Fetch from '%s' (%s): no download %r", client, context.peer(),
                        str(name)[:40])
            context.abort(grpc.StatusCode.NOT_FOUND, "no such download")
        with self._download_lock:
            head, body = self._download_encoder.encode(make(client))
        size = len(head) + len(body)
        log.info("sending %s (%d bytes) to '%s'", name, size, client)
        for frame in iter_frames((head, body), 1, self.section.chunk_bytes):
            if is_last(frame):  # handed to gRPC in full (code after the last yield may not run)
                self.traffic.record(direction="down", client=client, round=0, nbytes=size)
                with self._download_lock:  # everyone has it: drop the shared encoding (a client
                    self._downloaded.add(client)  # that restarts later gets a new one)
                    if self._downloaded >= set(self.clients):
                        self._download_encoder.clear()
            yield frame

    def _push(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        client = self._authenticate(context, "Push")
        if not self.mailbox.begin_push(client):  # ABORTED: the client retries after a backoff
            log.warning("refused a second concurrent upload from '%s' (%s)", client, context.peer())
            context.abort(grpc.StatusCode.ABORTED, "another upload of this client is in progress")
        watchdog = threading.Timer(self.section.round_timeout, context.cancel)
        watchdog.daemon = True
        watchdog.start()
        upload = Upload(client, self.mailbox, self.section.max_message_bytes)
        try:
            reassembler = Reassembler(self.section.max_message_bytes, self.max_chunk,
                                      on_start=upload.start, on_data=upload.data)
            data, first = None, 0.0
            for frame in frames:
                first = first or time.perf_counter()
                data = reassembler.add(frame)
                if data is not None:
                    break
            if data is None:
                reassembler.finish()
                raise FrameError("empty upload")
            self.last_upload = (len(data), time.perf_counter() - first)
            message = upload.message(data)
            accepted = self.mailbox.accept(message, len(data))
            return json.dumps({"status": "accepted" if accepted else "late"}).encode()
        except LateUpload as exc:
            self.mailbox.count("late", reassembler.received[0])
            log.warning("discarded a late upload from '%s': %s", client, str(exc)[:200])
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)[:200])
            raise  # not reached
        except MessageError as exc:  # too large: INVALID_ARGUMENT with a detail saying so
            self._refuse(client, context, grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:200])
            raise  # not reached
        finally:
            watchdog.cancel()
            self.mailbox.end_push(client)

    def _refuse(self, client: str, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> None:
        self.mailbox.count("rejected")
        log.warning("rejected an upload from '%s' (%s): %s", client, context.peer(), reason)
        context.abort(code, reason)
