"""Binary stream peers: length-prefixed messages and byte-stream passthrough.

A ``tcp``/``tls`` listener's ``framing`` says how its peers delimit messages
when they are not lines (``docs/protocol.md``):

- ``"u16"``/``"u32"``: a big-endian unsigned length of 2 or 4 bytes, then that
  many payload bytes, both ways. A length of 0 is an empty message, ignored. A
  length over ``max_message_bytes`` closes the connection before anything of
  that message is relayed (the complete messages before it are).
- ``"chunks"``: each read is a message (split at ``max_message_bytes``);
  outbound, payloads are written as they are. Order is kept, boundaries are not.

Messages from these peers are binary (``Kind.BINARY``), and the gateway never
writes text of its own (a welcome, a refusal) into their streams.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from zope.interface import implementer

from gateway.core.interfaces import IFramer
from gateway.core.message import Batch, Kind
from gateway.transports.runtime import ListenerRuntime
from gateway.transports.stream import StreamProtocol

_BINARY = (Kind.BINARY,)


class Clipped(NamedTuple):
    """A batch framed for a receiver whose prefix cannot carry all of it: what fits,
    and how many messages were too long for the prefix (dropped, counted)."""

    wire: bytes
    too_long: int


@implementer(IFramer)
class PrefixFramer:
    """Each payload after its big-endian length; a batch in one bytes object."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = struct.Struct(prefix)
        self.largest = (1 << (8 * self.prefix.size)) - 1  # the longest payload it can carry

    def frame(self, batch: Batch) -> bytes | Clipped:
        payloads = batch.payloads
        pack = self.prefix.pack
        if len(payloads) == 1:
            payload = payloads[0]
            if len(payload) <= self.largest:
                return pack(len(payload)) + payload
            return Clipped(b"", 1)
        sizes = list(map(len, payloads))
        if max(sizes) > self.largest:
            fitting = [payload for payload in payloads if len(payload) <= self.largest]
            clipped = self.frame(Batch(batch.origin, batch.channel, fitting)) if fitting else b""
            assert isinstance(clipped, bytes)
            return Clipped(clipped, len(payloads) - len(fitting))
        parts: list[bytes] = [b""] * (2 * len(payloads))
        parts[::2] = map(pack, sizes)
        parts[1::2] = payloads
        return b"".join(parts)

    def count(self, wire: bytes) -> int:
        size = self.prefix.size
        unpack = self.prefix.unpack_from
        count = offset = 0
        while offset < len(wire):
            offset += size + unpack(wire, offset)[0]
            count += 1
        return count


U16_FRAMER = PrefixFramer("u16", "!H")
U32_FRAMER = PrefixFramer("u32", "!I")


class Joined(bytes):
    """Several payloads written as one (``chunks``), knowing how many they were."""

    messages = 1


@implementer(IFramer)
class ChunkFramer:
    """The payloads as they are, nothing added: a byte stream."""

    name = "chunks"

    def frame(self, batch: Batch) -> bytes:
        payloads = batch.payloads
        if len(payloads) == 1:
            return payloads[0]
        joined = Joined(b"".join(payloads))
        joined.messages = len(payloads)
        return joined

    def count(self, wire: bytes) -> int:
        return wire.messages if isinstance(wire, Joined) else 1


CHUNK_FRAMER = ChunkFramer()


class BinaryProtocol(StreamProtocol):
    """What the binary framings share: binary batches, and no text of the gateway's own."""

    quiet = True

    def _publish_binary(self, payloads: list[bytes]) -> None:
        if payloads:
            kinds = _BINARY * len(payloads)
            self.bus.publish(self, Batch(self.origin, self.channel, payloads, kinds))


class PrefixedProtocol(BinaryProtocol):
    """A ``u16``/``u32`` peer: length-prefixed messages, both ways (``u32`` carries any
    message; ``U16Protocol`` drops the longer ones)."""

    def __init__(self, runtime: ListenerRuntime, framer: PrefixFramer) -> None:
        super().__init__(runtime)
        self.framer = framer
        self._prefix = framer.prefix
        # A message still arriving: its pieces, their length, and the length it needs.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self._first = b""  # while signing in: the first message as it came, prefix included

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                if self.flow is not None and self._signin is None:
                    self.flow.received(0)
                return
            data = b"".join(self._parts)
            self._parts = []
        if self._signin is not None:
            self._sign_in_message(data)
            return
        payloads, offset, over = self._split(data)
        assert self.flow is not None
        self.flow.received(len(payloads))
        self._publish_binary(payloads)
        if over:
            self._too_long(over)
        else:
            self._keep(data, offset)

    def _split(self, data: bytes, first_only: bool = False) -> tuple[list[bytes], int, int]:
        """The complete messages at the start of ``data``, where the rest starts, and the
        length of a message over ``max_message_bytes`` that stopped the split (else 0)."""
        size = self._prefix.size
        unpack = self._prefix.unpack_from
        limit = self.max_message_bytes
        payloads: list[bytes] = []
        offset = 0
        end = len(data)
        while end - offset >= size:
            length = unpack(data, offset)[0]
            if length > limit:
                return payloads, offset, length
            stop = offset + size + length
            if stop > end:
                break
            if length:
                payloads.append(data[offset + size : stop])
                if first_only:
                    return payloads, stop, 0
            offset = stop
        return payloads, offset, 0

    def _keep(self, data: bytes, offset: int) -> None:
        """Wait for the rest of the message that starts at ``offset``."""
        if offset >= len(data):
            return
        rest = data[offset:] if offset else data
        size = self._prefix.size
        self._parts = [rest]
        self._have = len(rest)
        self._need = size + self._prefix.unpack_from(rest)[0] if len(rest) >= size else size

    def _sign_in_message(self, data: bytes) -> None:
        """Until signed in: the first message is the sign-in; what follows waits, unread."""
        assert self._signin is not None
        if self._signin.checking:
            self._hold(self._buffer + data)
            return
        payloads, offset, over = self._split(data, first_only=True)
        if over:
            self._too_long(over)
        elif not payloads:
            self._keep(data, offset)
        else:
            self._first = data[:offset]
            self._buffer = data[offset:]
            self._sign_in(payloads[0])

    def _resume_input(self, first_is_ordinary: bool) -> None:
        waiting = (self._first if first_is_ordinary else b"") + self._buffer
        self._first = self._buffer = b""
        if waiting:
            self.dataReceived(waiting)


class U16Protocol(PrefixedProtocol):
    """A ``u16`` peer, which cannot receive messages over 65,535 bytes: dropped, counted."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__(runtime, U16_FRAMER)

    def deliver(self, wire: Any) -> None:
        if type(wire) is Clipped:
            self.bus.metrics.drop("u16_too_long", wire.too_long)
            wire = wire.wire
            if not wire:
                return
        super().deliver(wire)


class ChunkProtocol(BinaryProtocol):
    """A ``chunks`` peer: each read is a message; what reaches it is written as it is."""

    framer = CHUNK_FRAMER

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._signin is not None:
            if self._signin.checking:
                self._hold(self._buffer + data)
            elif data:
                # No message boundaries, so nothing read can be a sign-in: only "cert".
                self._buffer = data
                self._sign_in(b"", ordinary=True)
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if not data:
            return
        limit = self.max_message_bytes
        if len(data) <= limit:
            payloads = [data]
        else:
            payloads = [data[i : i + limit] for i in range(0, len(data), limit)]
        assert self.flow is not None
        self.flow.received(len(payloads))
        self._publish_binary(payloads)

    def _resume_input(self, first_is_ordinary: bool) -> None:
        if self._buffer:
            self.dataReceived(b"")


def protocol_for(runtime: ListenerRuntime) -> StreamProtocol | None:
    """A connection's protocol for a binary ``framing``; None for ``lines``."""
    framing = getattr(runtime.config, "framing", "lines")
    if framing == "u16":
        return U16Protocol(runtime)
    if framing == "u32":
        return PrefixedProtocol(runtime, U32_FRAMER)
    if framing == "chunks":
        return ChunkProtocol(runtime)
    return None
