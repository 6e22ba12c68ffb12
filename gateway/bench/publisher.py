"""Publishers: one message at a time (probes, a fixed rate), or blocks of them (flood)."""

from __future__ import annotations

import contextlib
import json
import select
from typing import TYPE_CHECKING

from gateway.bench.client import Client
from gateway.bench.clock import now_ns
from gateway.bench.jsonlines import request as json_request
from gateway.bench.wire import DATA, HEADER_SIZE, payload, ws_client_frame, ws_handshake

if TYPE_CHECKING:
    from gateway.bench.loop import Loop
    from gateway.bench.target import Target

BLOCK = 64
"""Messages per write of a flooding stream publisher by default (``--block``; a block size
divides 256: see ``_block_templates``)."""


class Publisher(Client):
    """Sends messages; drains (and ignores) whatever the server sends it."""

    def __init__(
        self,
        loop: Loop,
        target: Target,
        number: int,
        size: int,
        subject: str,
        channel: int = 0,
        publish_to: str | None = None,
        leave: str | None = None,
        block: int = BLOCK,
    ) -> None:
        super().__init__(loop, target)
        self.block = block
        self.number = number
        self.channel = channel
        self.leave = leave
        self.size = size
        self.subject = subject
        self.sequence = 0
        self.sent = 0
        scheme = target.scheme
        self.websocket = scheme in ("ws", "wss", "nats+ws")
        self.nats = scheme in ("nats", "nats+ws")
        self.datagram = scheme == "udp"
        self._accept = b""
        self._buffered = b""
        self.json = publish_to is not None
        prefix = f"PUB {subject} {size}\r\n".encode("ascii") if self.nats else b""
        suffix = b"\r\n" if self.nats else b"\n"
        if publish_to is not None:
            # A JSON envelope around the payload, which is ASCII with no quote or backslash.
            head = {"type": "message", "channel": publish_to, "text": ""}
            prefix = json.dumps(head, separators=(",", ":")).encode("ascii")[:-2]
            suffix = b'"}\n'
        self.prefix = prefix
        self.suffix = suffix
        self._templates = _block_templates(prefix, suffix, number, size, block)
        self.drain = bytearray(65536)
        self.drain_view = memoryview(self.drain)

    def connected(self) -> None:
        if self.datagram:
            self.state = self.READY
            return
        self.state = self.SETUP
        self.loop.modify(self, select.EPOLLIN)
        if self.websocket:
            request, self._accept = ws_handshake(self.target)
            self.send(request)
        elif not self.nats:
            if self.leave is not None and self.json:
                self.send(json_request("unsubscribe", self.leave))
            self.ready()

    def setup_readable(self) -> None:
        got = self.read_into(self.drain_view)
        if got < 0:
            return
        if got == 0:
            self.fail("closed during setup")
            return
        data = self._buffered + bytes(self.drain_view[:got])
        if self.websocket and self._accept:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                self._buffered = data
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0] + b" " or self._accept not in head:
                self.fail("WebSocket handshake refused")
                return
            self._accept = b""
            data = rest
            if not self.nats:
                self._buffered = b""
                self.ready()
                return
        if self.nats:
            if b"INFO " in data and b"CONNECT" not in self._buffered:
                text = (
                    b'CONNECT {"verbose":false,"pedantic":false,"name":"gateway-bench"}\r\nPING\r\n'
                )
                self.send(ws_client_frame(text, 0x2) if self.websocket else text)
                self._buffered = b"CONNECT"
            if b"PONG" in data:
                self._buffered = b""
                self.ready()
            elif b"-ERR" in data:
                self.fail("NATS: " + data.decode("utf-8", "replace").strip())

    def readable(self) -> None:
        view = self.drain_view
        for _ in range(64):
            got = self.read_into(view)
            if got < 0:
                return
            if got == 0:
                if self.state != self.CLOSED:
                    self.fail("closed by the server")
                return
            if self.nats and b"PING\r\n" in self.drain[:got]:
                pong = b"PONG\r\n"
                self.send(ws_client_frame(pong, 0x2) if self.websocket else pong)

    def frame(self, data: bytes) -> bytes:
        """One message in this publisher's protocol."""
        if self.websocket:
            inner = self.prefix + data + self.suffix if self.nats else data
            return ws_client_frame(inner, 0x2 if self.nats else 0x1)
        return self.prefix + data + self.suffix

    def publish_one(self, kind: int = DATA) -> None:
        data = payload(kind, self.number, self.sequence, now_ns(), self.size)
        if kind == DATA:
            self.sequence += 1
            self.sent += 1
        if self.datagram:
            assert self.sock is not None
            with contextlib.suppress(OSError):
                self.sock.send(data)
        else:
            self.send(self.frame(data))

    def publish_block(self) -> int:
        """Flood: write a block of ``self.block`` messages; returns how many."""
        sequence = self.sequence
        block = self.block
        if self.datagram or self.websocket:
            for _ in range(block):
                self.publish_one()
            return block
        template = self._templates[(sequence & 0xFF) // block]
        fields = {
            b"b": b"%010x" % ((sequence >> 8) & 0xFFFFFFFFFF),
            b"t": b"%016x" % now_ns(),
        }
        self.sequence = sequence + block
        self.sent += block
        self.send(template % fields)
        return block


def _block_templates(
    prefix: bytes, suffix: bytes, number: int, size: int, block: int
) -> list[bytes]:
    """Format strings for ``block`` consecutive messages, by the block's place in 256.

    The sequence's last two hex digits are literal in the template and the rest
    is one field, so a whole block is made by one ``%`` operation.
    """
    prefix = prefix.replace(b"%", b"%%")
    pad = b"." * (size - HEADER_SIZE)
    templates = []
    for first in range(0, 256, block):
        parts = [
            prefix + b"D%04x%%(b)s%02x%%(t)s" % (number, low) + pad + suffix
            for low in range(first, first + block)
        ]
        templates.append(b"".join(parts))
    return templates
