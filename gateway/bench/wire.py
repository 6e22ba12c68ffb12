"""What goes over the wire: the bench's messages and each subscriber protocol's framing.

Every client speaks its transport's real protocol: line streams (tcp, tls),
datagrams (udp, joined with the hello control datagram), WebSocket (ws, wss:
a real opening handshake, server frames parsed, client frames masked) and the
NATS text protocol (CONNECT, SUB, PUB, MSG, PING/PONG), over TCP or WebSocket.

Speed comes from working per received chunk, not per message: all messages of
a run have the same size, so a chunk of a stream holds ``n // length`` whole
messages, checked in bulk by one strided slice that picks each message's kind
byte (``D`` data, ``P`` probe) out of the chunk. Anything else (pings, other
messages, a broken alignment) falls back to a parser that looks at each frame.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import TYPE_CHECKING

from gateway.bench.target import Target

if TYPE_CHECKING:
    from gateway.bench.subscribers import StreamClient

HEADER_SIZE = 33
"""kind (1 byte), publisher (4 hex digits), sequence (12), send time in ns (16), then padding."""
DATA = ord("D")
PROBE = ord("P")


# Messages


def payload(kind: int, publisher: int, sequence: int, sent: int, size: int) -> bytes:
    """One message: a 33-byte header, then dots up to ``size`` bytes."""
    head = b"%c%04x%012x%016x" % (kind, publisher, sequence & 0xFFFFFFFFFFFF, sent)
    return head + b"." * (size - HEADER_SIZE)


def parse_header(data: bytes | bytearray, offset: int) -> tuple[int, int, int]:
    """(publisher, sequence, send time) of the message whose payload starts at ``offset``."""
    return (
        int(data[offset + 1 : offset + 5], 16),
        int(data[offset + 5 : offset + 17], 16),
        int(data[offset + 17 : offset + 33], 16),
    )


def ws_client_frame(data: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (RFC 6455 5.3) with a fresh masking key."""
    key = os.urandom(4)
    length = len(data)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    if not length:
        return head + key
    mask = int.from_bytes((key * (length // 4 + 1))[:length], "big")
    masked = (int.from_bytes(data, "big") ^ mask).to_bytes(length, "big")
    return head + key + masked


def ws_handshake(target: Target, protocol: str | None = None) -> tuple[bytes, bytes]:
    """The opening handshake request and the ``Sec-WebSocket-Accept`` it must be answered with."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode('ascii')}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"), accept


# What a subscriber receives: fixed-size messages in each protocol's framing


class Wire:
    """The framing of one subscriber protocol, for messages of ``size`` payload bytes."""

    name = "stream"

    def __init__(self, size: int, prefix: bytes, suffix: bytes) -> None:
        self.size = size
        self.prefix = prefix
        self.offset = len(prefix)
        self.length = len(prefix) + size + len(suffix)
        self.end_byte = (suffix or b"\0")[-1] if suffix else -1

    def slow(self, data: bytes, sub: StreamClient) -> int:
        """Parse ``data`` frame by frame, calling ``sub.message``; returns bytes consumed.

        Stops after the first frame that is not a regular message (a ping, a
        message of another size), so that the bulk path can take over again.
        """
        raise NotImplementedError


class LineWire(Wire):
    name = "line"

    def __init__(self, size: int) -> None:
        super().__init__(size, b"", b"\n")

    def slow(self, data: bytes, sub: StreamClient) -> int:
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                return pos
            regular = sub.message(data, pos, end - pos)
            pos = end + 1
            if not regular:
                return pos


class PrefixWire(Wire):
    """Messages after their big-endian length (a listener's ``framing = "u16"``/``"u32"``)."""

    def __init__(self, size: int, framing: str) -> None:
        self.name = framing
        self.head = struct.Struct("!H" if framing == "u16" else "!I")
        super().__init__(size, self.head.pack(size), b"")

    def slow(self, data: bytes, sub: StreamClient) -> int:
        pos = 0
        total = len(data)
        size = self.head.size
        while total - pos >= size:
            length: int = self.head.unpack_from(data, pos)[0]
            start = pos + size
            if total - start < length:
                break
            regular = sub.message(data, start, length)
            pos = start + length
            if not regular:
                return pos
        return pos


class WebSocketWire(Wire):
    name = "websocket"

    def __init__(self, size: int) -> None:
        if size < 126:
            head = struct.pack("!BB", 0x81, size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x81, 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 127, size)
        super().__init__(size, head, b"")

    def slow(self, data: bytes, sub: StreamClient) -> int:
        pos = 0
        total = len(data)
        while total - pos >= 2:
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if total - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if total - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if second & 0x80:
                sub.fail("the server sent a masked frame")
                return total
            if total - pos < head + length:
                break
            start = pos + head
            opcode = first & 0x0F
            regular = False
            if opcode in (0x0, 0x1, 0x2):
                regular = sub.frame_payload(data, start, length)
            elif opcode == 0x9:
                sub.send(ws_client_frame(data[start : start + length], 0xA))
            elif opcode == 0x8:
                sub.fail("the server closed the WebSocket")
                return total
            pos = start + length
            if not regular:
                return pos
        return pos


class NatsWire(Wire):
    name = "nats"

    def __init__(self, size: int, subject: str, sid: int) -> None:
        super().__init__(size, f"MSG {subject} {sid} {size}\r\n".encode("ascii"), b"\r\n")

    def slow(self, data: bytes, sub: StreamClient) -> int:
        pos = 0
        total = len(data)
        while True:
            end = data.find(b"\r\n", pos)
            if end < 0:
                return pos
            line = data[pos:end]
            if line.startswith(b"MSG "):
                words = line.split()
                length = int(words[-1])
                start = end + 2
                if total < start + length + 2:
                    return pos
                regular = sub.message(data, start, length)
                pos = start + length + 2
                if not regular:
                    return pos
                continue
            if line == b"PING":
                sub.reply(b"PONG\r\n")
            elif line == b"PONG":
                sub.pong()
            elif line.startswith(b"INFO "):
                sub.info()
            elif line.startswith(b"-ERR"):
                sub.fail("NATS: " + line.decode("utf-8", "replace"))
                return total
            return end + 2
