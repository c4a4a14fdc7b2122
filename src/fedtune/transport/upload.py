"""One client upload read under what the server expects: refused at its first frame when larger,
at its index when it names other tensors, and decoded in place (the buffer is held once)."""

from __future__ import annotations

from fedtune.errors import MessageError
from fedtune.transport.codec import (
    MAX_TENSORS,
    Head,
    check_tensor_specs,
    head_size,
    header_size,
    read_head,
    read_header,
    tensors_of,
)
from fedtune.transport.expect import Expectation
from fedtune.transport.framing import FrameError
from fedtune.transport.mailbox import Mailbox
from fedtune.wire import Message, MessageKind

SERVER_NAME = "server"


class LateUpload(MessageError):
    """The upload answers no request that is still pending (its round ended, or never asked)."""


class Upload:
    """Checks an upload from authenticated `client` as its bytes arrive (Reassembler callbacks)."""

    def __init__(self, client: str, mailbox: Mailbox, ceiling: int):
        self.client, self.mailbox, self.ceiling = client, mailbox, ceiling
        self.declared = 0
        self.limit = ceiling
        self.header: dict | None = None
        self.expectation: Expectation | None = None
        self.head: Head | None = None

    def start(self, declared: int) -> None:
        """First frame: refuse a declared size over what any pending request of the client allows."""
        self.declared = declared
        self.limit = self.mailbox.upload_limit(self.client, self.ceiling)
        if declared > self.limit:
            if not self.mailbox.expectation_pending(self.client) and declared <= self.ceiling:
                raise LateUpload(f"late: no reply is awaited from '{self.client}' now "
                                 f"(an upload of {declared} bytes)")
            raise FrameError(f"too large: a message of {declared} bytes is over the limit of "
                             f"{self.limit} bytes expected from '{self.client}' now", too_large=True)

    def data(self, buffer: bytearray) -> None:
        """After each chunk: read the header, then the tensor index, as soon as they are complete."""
        if self.head is not None:
            return
        if self.header is None:
            header_end = header_size(buffer)  # checks the magic and header length at once
            if header_end is None or len(buffer) < header_end:
                return
            self.header = read_header(buffer)
            self._match(self.header)
        specs = self.expectation.specs if self.expectation is not None else None
        # the index of exactly the expected tensors has a known bound: a longer one is refused
        # at its length field, before it is parsed
        max_index = self.limit if specs is None else self.expectation.index_bytes + 8
        needed = head_size(buffer, max_index_bytes=max_index)
        if needed is None or len(buffer) < needed:
            return
        head = read_head(buffer, max_tensors=MAX_TENSORS if specs is None else len(specs),
                         max_index_bytes=max_index, header=self.header)
        if specs is not None:
            check_tensor_specs(head.tensors, specs)
        if head.size != self.declared:
            raise MessageError(f"the message declares {self.declared} bytes but its head "
                               f"describes {head.size}")
        self.head = head

    def _match(self, header: dict) -> None:
        if header["sender"] != self.client:
            raise MessageError(f"sender '{header['sender']}' is not the caller '{self.client}'")
        if header["receiver"] != SERVER_NAME:
            raise MessageError(f"receiver '{header['receiver']}' is not '{SERVER_NAME}'")
        kind = MessageKind(header["kind"])
        self.expectation = self.mailbox.expectation(self.client, header["round"], kind)
        if self.expectation is None:
            raise LateUpload(f"late: no {kind.value} of round {header['round']} is awaited "
                             f"from '{self.client}' now")

    def message(self, data: bytearray) -> Message:
        """The whole upload, decoded in place (tensors are views of `data`)."""
        if self.head is None or self.header is None or len(data) != self.head.size:
            raise MessageError("the upload ended before its head was complete")
        header = self.header
        return Message(kind=MessageKind(header["kind"]), round=header["round"],
                       sender=header["sender"], receiver=header["receiver"],
                       tensors=tensors_of(data, self.head), meta=header["meta"])
