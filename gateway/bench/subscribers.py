"""Subscribers: count, check and time the messages they receive, over streams and datagrams."""

from __future__ import annotations

import contextlib
import select
import socket
from array import array
from typing import TYPE_CHECKING

from gateway.bench.client import Client
from gateway.bench.clock import now_ns
from gateway.bench.wire import (
    DATA,
    PROBE,
    LineWire,
    NatsWire,
    PrefixWire,
    WebSocketWire,
    Wire,
    parse_header,
    ws_client_frame,
    ws_handshake,
)
from gateway.transports.datagram.wire import HELLO

if TYPE_CHECKING:
    from gateway.bench.loop import Loop
    from gateway.bench.target import Target


class Tally:
    """What the subscribers of one transport received."""

    __slots__ = ("count", "foreign", "latencies", "misordered", "probes")

    def __init__(self) -> None:
        self.count = 0
        self.probes = 0
        self.misordered = 0
        self.foreign = 0
        self.latencies = array("q")


class StreamClient(Client):
    """A subscriber on a stream transport: tcp, tls, ws, wss, nats, nats+ws."""

    def __init__(
        self,
        loop: Loop,
        target: Target,
        tally: Tally,
        size: int,
        subject: str,
        source: str | None = None,
        channel: int = 0,
        channels: int = 1,
    ) -> None:
        super().__init__(loop, target, source)
        self.tally = tally
        self.size = size
        self.subject = subject
        self.channel = channel
        self.channels = channels
        self.count = 0
        self.synced = False
        self.rest = b""
        self.last_sequence: dict[int, int] = {}
        scheme = target.scheme
        self.websocket = scheme in ("ws", "wss", "nats+ws")
        self.nats = scheme in ("nats", "nats+ws")
        self.wire: Wire
        if self.nats:
            self.wire = NatsWire(size, subject, 1)
        elif self.websocket:
            self.wire = WebSocketWire(size)
        elif target.framing != "lines":
            self.wire = PrefixWire(size, target.framing)
        else:
            self.wire = LineWire(size)
        # NATS over WebSocket: the NATS stream is carried in frames of any size.
        self.inner: bytearray | None = bytearray() if self.nats and self.websocket else None
        self.frame_wire = WebSocketWire(size) if self.inner is not None else None
        self._accept = b""
        self._subscribed = False

    def connected(self) -> None:
        self.state = self.SETUP
        self.loop.modify(self, select.EPOLLIN)
        if self.websocket:
            request, self._accept = ws_handshake(self.target)
            self.send(request)
        elif not self.nats:  # NATS: the server speaks first (INFO)
            self.ready()

    def info(self) -> None:
        """The NATS server introduced itself: subscribe, and ask for a PONG to know it is done."""
        if self.state != self.SETUP or self._subscribed:
            return
        self._subscribed = True
        connect = b'CONNECT {"verbose":false,"pedantic":false,"name":"gateway-bench"}\r\n'
        text = connect + f"SUB {self.subject} 1\r\nPING\r\n".encode("ascii")
        self.send(ws_client_frame(text, 0x2) if self.websocket else text)

    def pong(self) -> None:
        if self.state == self.SETUP:
            self.ready()

    def reply(self, data: bytes) -> None:
        """Send NATS protocol text (inside a frame when over WebSocket)."""
        self.send(ws_client_frame(data, 0x2) if self.websocket else data)

    def setup_bytes(self) -> bytes | None:
        """What arrived while setting up (None: nothing, or the connection failed)."""
        chunks = []
        while True:
            view = self.loop.view
            got = self.read_into(view)
            if got < 0:
                break
            if got == 0:
                self.fail("closed during setup")
                return None
            chunks.append(bytes(view[:got]))
            if not self.target.secure:
                break
        return b"".join(chunks) if chunks else None

    def setup_readable(self) -> None:
        data = self.setup_bytes()
        if data is None:
            return
        if self._accept:  # waiting for the HTTP answer to the WebSocket handshake
            data = self.rest + data
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                self.rest = data
                return
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" " or self._accept not in head:
                self.fail("WebSocket handshake refused: " + status.decode("ascii", "replace"))
                return
            self._accept = b""
            self.rest = b""
            data = rest
            if not self.nats:
                self.ready()
        self.consume_bytes(data)

    # Receiving

    def readable(self) -> None:
        view = self.loop.view
        capacity = len(view)
        rest = self.rest
        filled = len(rest)
        if filled:
            view[:filled] = rest
        secure = self.target.secure
        while True:
            got = self.read_into(view[filled:capacity])
            if got < 0:
                break
            if got == 0:
                if self.state != self.CLOSED:
                    self.fail("closed by the server")
                return
            filled += got
            if not secure:
                break
            # TLS hands out one record a call: read until it has nothing buffered.
            if filled > capacity - 65536:
                used = self.consume(filled)
                filled -= used
                view[:filled] = view[used : used + filled]
        if self.state == self.CLOSED:
            return
        used = self.consume(filled)
        self.rest = bytes(view[used:filled])

    def consume_bytes(self, data: bytes) -> None:
        """Process bytes that were read during setup."""
        view = self.loop.view
        data = self.rest + data
        view[: len(data)] = data
        used = self.consume(len(data))
        self.rest = bytes(view[used : len(data)])

    def consume(self, filled: int) -> int:
        """Count the messages in the loop's buffer up to ``filled``; returns bytes used."""
        if self.inner is not None:
            return self._consume_frames(filled)
        return self._consume(self.loop.buffer, filled)

    def _consume_frames(self, filled: int) -> int:
        assert self.frame_wire is not None and self.inner is not None
        data = bytes(self.loop.view[:filled])
        used = self.frame_wire.slow(data, self)
        inner = self.inner
        if inner:
            done = self._consume(inner, len(inner))
            del inner[:done]
        return used

    def frame_payload(self, data: bytes, start: int, length: int) -> bool:
        """A WebSocket data frame's payload (its message, or NATS stream bytes)."""
        if self.inner is not None:
            self.inner += data[start : start + length]
            return True
        return self.message(data, start, length)

    def _consume(self, buffer: bytearray, filled: int) -> int:
        base = 0
        while True:
            if self.state == self.READY:
                used = self._bulk(buffer, base, filled)
                if used >= 0:
                    base += used
                    if base == filled:
                        return base
                    # Less than a message is left: a part of one, or a small frame
                    # such as a ping that must be answered even when nothing follows.
            elif self.state == self.CLOSED:
                return filled
            used = self.wire.slow(bytes(buffer[base:filled]), self)
            if not used:
                return base
            base += used

    def _bulk(self, buffer: bytearray, base: int, filled: int) -> int:
        """Count the whole messages from ``base`` in one go; -1 if they are not all regular."""
        wire = self.wire
        length = wire.length
        whole = (filled - base) // length
        if not whole:
            return -1 if filled - base > 16 * length + 65536 else 0
        end = base + whole * length
        offset = base + wire.offset
        kinds = buffer[offset:end:length]
        data_count = kinds.count(DATA)
        probes = kinds.count(PROBE)
        if data_count + probes != whole or (
            wire.end_byte >= 0 and buffer[end - 1] != wire.end_byte
        ):
            return -1
        if probes:
            self.synced = True
            self.tally.probes += probes
        if data_count:
            self.count += data_count
            self.tally.count += data_count
            loop = self.loop
            if loop.measuring:
                received = loop.now
                latencies = self.tally.latencies
                if loop.parse_all:
                    for start in range(offset, end, length):
                        if buffer[start] == DATA:
                            latencies.append(received - self._check(buffer, start))
                else:
                    start = end - length + wire.offset
                    if buffer[start] == DATA:
                        latencies.append(received - int(buffer[start + 17 : start + 33], 16))
            elif loop.parse_all:
                for start in range(offset, end, length):
                    if buffer[start] == DATA:
                        self._check(buffer, start)
        return end - base

    def _check(self, buffer: bytes | bytearray, start: int) -> int:
        """Follow the sequence of a message's publisher; returns its send time."""
        publisher, sequence, sent = parse_header(buffer, start)
        last = self.last_sequence.get(publisher, -1)
        if sequence != last + 1:
            self.tally.misordered += 1
        if self.channel >= 0 and publisher % self.channels != self.channel:
            self.tally.foreign += 1  # another channel's message
        self.last_sequence[publisher] = sequence
        return sent

    def message(self, data: bytes, start: int, length: int) -> bool:
        """One message found by a slow parser; False when it is not one of the bench's."""
        if length != self.size:
            return False
        kind = data[start]
        if kind == PROBE:
            self.synced = True
            self.tally.probes += 1
        elif kind == DATA:
            self.count += 1
            self.tally.count += 1
            loop = self.loop
            if loop.parse_all or loop.measuring:
                sent = self._check(data, start)
                if loop.measuring:
                    self.tally.latencies.append(loop.now - sent)
        else:
            return False
        return True


class DatagramClient(Client):
    """A UDP subscriber: joins with a hello, then each datagram is one message."""

    def __init__(
        self, loop: Loop, target: Target, tally: Tally, size: int, source: str | None = None
    ) -> None:
        super().__init__(loop, target, source)
        self.tally = tally
        self.size = size
        self.channel = 0
        self.count = 0
        self.synced = False
        self.last_sequence: dict[int, int] = {}
        self.scratch = bytearray(65536)
        self.scratch_view = memoryview(self.scratch)

    def start(self) -> None:
        super().start()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def connected(self) -> None:
        self.ready_at = now_ns()
        self.state = self.READY
        self.keepalive()

    def keepalive(self) -> None:
        if self.state == self.READY:
            assert self.sock is not None
            with contextlib.suppress(OSError):
                self.sock.send(HELLO)

    def readable(self) -> None:
        sock = self.sock
        assert sock is not None
        buffer = self.scratch
        view = self.scratch_view
        for _ in range(512):
            try:
                got = sock.recv_into(view)
            except BlockingIOError:
                return
            except OSError as e:  # e.g. ICMP port unreachable: the listener is gone
                self.fail(f"receive: {e}")
                return
            self.message(buffer, got)

    def message(self, data: bytes | bytearray, length: int) -> None:
        """One datagram (or DTLS record): a message of the bench when it is ``size`` bytes and
        a newline (its first ``length`` bytes of ``data``)."""
        if length != self.size + 1:
            return
        kind = data[0]
        tally = self.tally
        if kind == DATA:
            self.count += 1
            tally.count += 1
            loop = self.loop
            if loop.parse_all or loop.measuring:
                publisher, sequence, sent = parse_header(data, 0)
                last = self.last_sequence.get(publisher, -1)
                if sequence != last + 1:
                    tally.misordered += 1
                self.last_sequence[publisher] = sequence
                if loop.measuring:
                    tally.latencies.append(now_ns() - sent)
        elif kind == PROBE:
            self.synced = True
            tally.probes += 1


Subscriber = StreamClient | DatagramClient
