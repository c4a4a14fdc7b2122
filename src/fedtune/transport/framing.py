"""Chunk frames that carry encoded messages over gRPC streams, and their bounded reassembly.

A frame is a fixed 25-byte header (magic, message id, chunk index, flags, total message size)
followed by at most one chunk of the encoded message. Reassembly enforces the size limit while
receiving: a stream that declares or delivers more than the limit is refused at once, so memory
stays bounded by one message plus one chunk. Chunks are appended to one bytearray that
`codec.decode` then views in place: a message is held once, never joined into a second copy.
The byte layout of a message inside the frames belongs to the codec.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fedtune.errors import MessageError
from fedtune.transport.codec import encode_header, encode_tensors, read_header
from fedtune.wire import Message

FRAME_MAGIC = b"FTF1"
FRAME = struct.Struct("<4sQIBQ")  # magic, message id, chunk index, flags, total message bytes
LAST = 1
PING = 2

Buffer = bytes | memoryview


class FrameError(MessageError):
    """A stream of frames is malformed; `too_large` when it breaks the size limit."""

    def __init__(self, reason: str, *, too_large: bool = False):
        prefix = "too large: " if too_large and not reason.startswith("too large") else ""
        super().__init__(prefix + reason)
        self.too_large = too_large


def is_last(frame: Buffer) -> bool:
    """Whether `frame` (made by iter_frames) ends its message."""
    return bool(FRAME.unpack_from(frame)[3] & LAST)


def ping_frame() -> bytes:
    """A frame with no message: keeps an idle stream alive and tells a client it is connected."""
    return FRAME.pack(FRAME_MAGIC, 0, 0, PING, 0)


def iter_frames(parts: Sequence[Buffer], message_id: int, chunk_bytes: int) -> Iterator[bytes]:
    """Frames of the message made by concatenating `parts`, each payload at most `chunk_bytes`."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    index, sent = 0, 0
    part, offset = 0, 0
    while True:
        pieces: list[memoryview] = []
        room = chunk_bytes
        while room and part < len(views):
            take = views[part][offset:offset + room]
            pieces.append(take)
            room -= len(take)
            offset += len(take)
            if offset == len(views[part]):
                part, offset = part + 1, 0
        size = chunk_bytes - room
        sent += size
        last = sent == total
        header = FRAME.pack(FRAME_MAGIC, message_id, index, LAST if last else 0, total)
        yield b"".join((header, *pieces))
        if last:
            return
        index += 1


class Reassembler:
    """Feeds frames in, gets whole messages out; raises FrameError on anything irregular.

    `on_start(declared_size)` runs at a message's first frame and `on_data(buffer)` after every
    chunk (the bytes so far); either may raise (a MessageError) to refuse the message early.
    """

    def __init__(self, max_bytes: int, max_chunk: int, *,
                 on_start: Callable[[int], None] | None = None,
                 on_data: Callable[[bytearray], None] | None = None):
        self.max_bytes = max_bytes
        self.max_chunk = max_chunk
        self.on_start = on_start
        self.on_data = on_data
        self._id: int | None = None
        self._index = 0
        self._total = 0
        self._received = 0
        self._buffer = bytearray()

    @property
    def in_progress(self) -> bool:
        return self._id is not None

    @property
    def received(self) -> tuple[int, int]:
        """Bytes received of the message in progress, and its declared size."""
        return self._received, self._total

    def add(self, frame: Buffer) -> bytearray | None:
        """The complete message when `frame` is its last one, otherwise None."""
        if len(frame) < FRAME.size:
            raise FrameError(f"frame of {len(frame)} bytes is shorter than its header")
        magic, message_id, index, flags, total = FRAME.unpack_from(frame)
        if magic != FRAME_MAGIC:
            raise FrameError("bad frame magic")
        if flags & ~(LAST | PING):
            raise FrameError(f"unknown frame flags {flags}")
        payload = memoryview(frame)[FRAME.size:]  # no copy; extending the buffer makes the one copy
        if flags & PING:
            if self.in_progress or len(payload) or flags & LAST:
                raise FrameError("ping frame inside a message")
            return None
        if len(payload) > self.max_chunk:
            raise FrameError(f"chunk of {len(payload)} bytes is over {self.max_chunk}", too_large=True)
        if self._id is None:
            if index != 0:
                raise FrameError(f"message starts with chunk {index}, not 0")
            if total > self.max_bytes:
                raise FrameError(f"message of {total} bytes is over the limit of {self.max_bytes}",
                                 too_large=True)
            if self.on_start is not None:
                self.on_start(total)
            self._id, self._index, self._total, self._received = message_id, 0, total, 0
            self._buffer = bytearray()
        elif message_id != self._id or index != self._index or total != self._total:
            raise FrameError(f"frame (message {message_id}, chunk {index}) out of sequence")
        self._received += len(payload)
        if self._received > self._total:
            raise FrameError(f"message is longer than its declared {self._total} bytes", too_large=True)
        self._buffer += payload
        self._index += 1
        if self.on_data is not None and payload:
            self.on_data(self._buffer)
        if not flags & LAST:
            if not payload:
                raise FrameError("empty chunk before the last frame")
            if self._received == self._total:
                raise FrameError("message complete but its last frame is not marked")
            return None
        if self._received != self._total:
            raise FrameError(f"last frame after {self._received} of {self._total} bytes")
        data, self._buffer = self._buffer, bytearray()
        self._id = None
        return data

    def finish(self) -> None:
        """Call at the end of a stream: a message left half-received is an error."""
        if self.in_progress:
            raise FrameError(f"stream ended after {self._received} of {self._total} bytes")


class SharedEncoder:
    """Encodes messages as (head, tensor part); messages with the same tensors dict share one part.

    The server sends the same global adapter to every client of a round; encoding its tensors once
    keeps one copy in memory instead of one per client. head + part is exactly `encode(message)`.
    """

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] | None = None
        self._part: bytes | None = None

    def encode(self, message: Message) -> tuple[bytes, Buffer]:
        head = encode_header(message)
        if message.tensors is not self._tensors or self._part is None:
            self._part = encode_tensors(message.tensors)
            self._tensors = message.tensors
        return head, self._part

    def clear(self) -> None:
        """Forget the shared part (call when a round's sends are done)."""
        self._tensors, self._part = None, None


def peek_header(data: Buffer) -> dict[str, Any]:
    """The checked JSON header of an encoded message (kind, round, sender, receiver, meta), tensors
    unread; raises MessageError (never anything else) for a malformed one."""
    return read_header(data)
