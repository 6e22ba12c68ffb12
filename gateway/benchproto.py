"""The wire side of ``gateway bench``: message format, client protocols, event loop.

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
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import heapq
import os
import select
import socket
import ssl
import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

now_ns = time.monotonic_ns
"""The send and receive clock: CLOCK_MONOTONIC, the same in every process of a machine."""

HEADER_SIZE = 33
"""kind (1 byte), publisher (4 hex digits), sequence (12), send time in ns (16), then padding."""
DATA = ord("D")
PROBE = ord("P")
BLOCK = 64
"""Messages per write of a flooding stream publisher (divides 256: see ``_block_templates``)."""
UDP_HELLO = b"\x00GW1 hello"
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module before 3.12

SCHEMES = ("tcp", "tls", "udp", "ws", "wss", "nats", "nats+ws")
STREAM_SCHEMES = ("tcp", "tls", "ws", "wss", "nats", "nats+ws")


class BenchError(Exception):
    """A usage or setup problem; ``str()`` is the message."""


# Targets


@dataclass(frozen=True)
class Target:
    """Where and how a client connects, from a URL such as ``ws://127.0.0.1:8080/ws``."""

    scheme: str
    host: str
    port: int
    path: str = "/"

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise BenchError(
                f"unsupported URL {url!r}: expected " + ", ".join(f"{s}://" for s in SCHEMES)
            )
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise BenchError(f"bad URL {url!r}: expected {parts.scheme}://HOST:PORT")
        path = parts.path or ("/" if parts.scheme == "nats+ws" else "/ws")
        return cls(parts.scheme, parts.hostname, port, path)

    @property
    def transport(self) -> str:
        return self.scheme

    @property
    def secure(self) -> bool:
        return self.scheme in ("tls", "wss")

    @property
    def lossy(self) -> bool:
        """Whether messages may be lost by design (no flow control)."""
        return self.scheme == "udp"

    def __str__(self) -> str:
        path = self.path if self.scheme in ("ws", "wss", "nats+ws") else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{path}"


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


# Statistics


class Tally:
    """What the subscribers of one transport received."""

    __slots__ = ("count", "latencies", "misordered", "probes")

    def __init__(self) -> None:
        self.count = 0
        self.probes = 0
        self.misordered = 0
        self.latencies = array("q")


# Clients


class Client:
    """One socket in the loop, from connect to close."""

    CONNECTING, HANDSHAKE, SETUP, READY, CLOSED = range(5)

    def __init__(self, loop: Loop, target: Target, source: str | None = None) -> None:
        self.loop = loop
        self.target = target
        self.source = source
        self.state = self.CONNECTING
        self.error: str | None = None
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.fd = -1
        self.out = b""
        self._events = 0
        self.ready_at = 0

    # Life cycle

    def start(self) -> None:
        target = self.target
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if target.scheme == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        sock.setblocking(False)
        if self.source is not None:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
        self.sock = sock
        self.fd = sock.fileno()
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex((target.host, target.port))
            if code not in (0, errno.EINPROGRESS):
                self.fail(f"connect: {os.strerror(code)}")
                return
            self.loop.register(self, select.EPOLLOUT)
        else:
            sock.connect((target.host, target.port))
            self.loop.register(self, select.EPOLLIN)
            self.connected()

    def handle(self, events: int) -> None:
        state = self.state
        if state == self.READY:
            if events & select.EPOLLIN:
                self.readable()
            if events & select.EPOLLOUT and self.state == self.READY:
                self.flush()
            if events & (select.EPOLLERR | select.EPOLLHUP) and self.state == self.READY:
                self.readable()
            return
        if state == self.CONNECTING:
            assert self.sock is not None
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(f"connect: {os.strerror(code)}")
                return
            if self.target.secure:
                self._start_tls()
            else:
                self.connected()
        elif state == self.HANDSHAKE:
            self._tls_step()
        elif state == self.SETUP:
            if events & select.EPOLLOUT and self.out:
                self.flush()
            if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                self.setup_readable()
        elif state == self.CLOSED:
            self.loop.unregister(self)

    def _start_tls(self) -> None:
        assert self.sock is not None
        context = self.loop.tls_context(alpn=self.target.scheme == "wss")
        self.loop.unregister(self)
        self.sock = context.wrap_socket(
            self.sock, server_hostname=self.target.host, do_handshake_on_connect=False
        )
        self.fd = self.sock.fileno()
        self.state = self.HANDSHAKE
        self.loop.register(self, select.EPOLLIN)
        self._tls_step()

    def _tls_step(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.modify(self, select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.loop.modify(self, select.EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as e:
            self.fail(f"TLS handshake: {e}")
            return
        self.loop.modify(self, select.EPOLLIN)
        self.connected()

    def connected(self) -> None:
        """The transport is up (after TLS, when any); start the protocol's own setup."""
        self.ready()

    def ready(self) -> None:
        self.ready_at = now_ns()
        self.state = self.READY
        self.loop.modify(self, select.EPOLLIN | (select.EPOLLOUT if self.out else 0))

    def setup_readable(self) -> None:
        raise NotImplementedError

    def readable(self) -> None:
        raise NotImplementedError

    def fail(self, error: str) -> None:
        if self.state == self.CLOSED:
            return
        if self.error is None:
            self.error = error
        self.close()

    def close(self) -> None:
        if self.state == self.CLOSED:
            return
        self.state = self.CLOSED
        self.loop.unregister(self)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()

    # Output

    def send(self, data: bytes) -> None:
        """Write ``data`` now, keeping what the socket does not take for later."""
        if self.state == self.CLOSED:
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        sock = self.sock
        assert sock is not None
        out = self.out
        while out:
            try:
                sent = sock.send(out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as e:
                self.fail(f"send: {e}")
                return
            out = out[sent:]
        self.out = out
        wanted = select.EPOLLIN | (select.EPOLLOUT if out else 0)
        if wanted != self._events:
            self.loop.modify(self, wanted)

    def read_into(self, view: memoryview) -> int:
        """Read what is available into ``view``; -1 when nothing was, 0 at end of stream."""
        sock = self.sock
        assert sock is not None
        try:
            return sock.recv_into(view)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return -1
        except OSError as e:
            self.fail(f"receive: {e}")
            return 0


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
    ) -> None:
        super().__init__(loop, target, source)
        self.tally = tally
        self.size = size
        self.subject = subject
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

    def setup_readable(self) -> None:
        chunks = []
        while True:
            view = self.loop.view
            got = self.read_into(view)
            if got < 0:
                break
            if got == 0:
                self.fail("closed during setup")
                return
            chunks.append(bytes(view[:got]))
            if not self.target.secure:
                break
        if not chunks:
            return
        data = b"".join(chunks)
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
                self.sock.send(UDP_HELLO)

    def readable(self) -> None:
        sock = self.sock
        assert sock is not None
        buffer = self.scratch
        view = self.scratch_view
        expected = self.size + 1
        loop = self.loop
        tally = self.tally
        for _ in range(512):
            try:
                got = sock.recv_into(view)
            except BlockingIOError:
                return
            except OSError as e:  # e.g. ICMP port unreachable: the listener is gone
                self.fail(f"receive: {e}")
                return
            if got != expected:
                continue
            kind = buffer[0]
            if kind == DATA:
                self.count += 1
                tally.count += 1
                if loop.parse_all or loop.measuring:
                    publisher, sequence, sent = parse_header(buffer, 0)
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


class Publisher(Client):
    """Sends messages; drains (and ignores) whatever the server sends it."""

    def __init__(self, loop: Loop, target: Target, number: int, size: int, subject: str) -> None:
        super().__init__(loop, target)
        self.number = number
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
        prefix = f"PUB {subject} {size}\r\n".encode("ascii") if self.nats else b""
        suffix = b"\r\n" if self.nats else b"\n"
        self.prefix = prefix
        self.suffix = suffix
        self._templates = _block_templates(prefix, suffix, number, size)
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
        """Flood: write a block of ``BLOCK`` messages; returns how many."""
        sequence = self.sequence
        if self.datagram or self.websocket:
            for _ in range(BLOCK):
                self.publish_one()
            return BLOCK
        template = self._templates[(sequence & 0xFF) // BLOCK]
        fields = {
            b"b": b"%010x" % ((sequence >> 8) & 0xFFFFFFFFFF),
            b"t": b"%016x" % now_ns(),
        }
        self.sequence = sequence + BLOCK
        self.sent += BLOCK
        self.send(template % fields)
        return BLOCK


def _block_templates(prefix: bytes, suffix: bytes, number: int, size: int) -> list[bytes]:
    """Format strings for ``BLOCK`` consecutive messages, by the block's place in 256.

    The sequence's last two hex digits are literal in the template and the rest
    is one field, so a whole block is made by one ``%`` operation.
    """
    prefix = prefix.replace(b"%", b"%%")
    pad = b"." * (size - HEADER_SIZE)
    templates = []
    for first in range(0, 256, BLOCK):
        parts = [
            prefix + b"D%04x%%(b)s%02x%%(t)s" % (number, low) + pad + suffix
            for low in range(first, first + BLOCK)
        ]
        templates.append(b"".join(parts))
    return templates


# The event loop


class _Libc:
    """``timerfd`` through ctypes (``os.timerfd_create`` arrived in Python 3.13)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self.lib = ctypes.CDLL(name, use_errno=True) if name else None

    def timerfd(self, interval_ns: int) -> int | None:
        lib = self.lib
        if lib is None or not hasattr(lib, "timerfd_create"):
            return None
        fd = int(lib.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            return None
        seconds, nanos = divmod(interval_ns, 1_000_000_000)
        spec = (ctypes.c_long * 4)(seconds, nanos, seconds, nanos)
        if lib.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
            os.close(fd)
            return None
        return fd


class Ticker:
    """Calls ``tick(n)`` at a fixed rate (n > 1 when the loop was late)."""

    def __init__(self, loop: Loop, interval_ns: int, tick: Callable[[int], None]) -> None:
        self.loop = loop
        self.tick = tick
        self.interval = interval_ns
        self.fd = _Libc().timerfd(interval_ns)
        self.next = now_ns() + interval_ns
        self.state = Client.READY
        if self.fd is not None:
            loop.register(self, select.EPOLLIN)
        else:
            loop.call_at(self.next, self._timer)

    def handle(self, events: int) -> None:
        assert self.fd is not None
        try:
            expirations = int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return
        self.tick(expirations)

    def _timer(self) -> None:
        if self.state == Client.CLOSED:
            return
        now = now_ns()
        due = 0
        while self.next <= now:
            self.next += self.interval
            due += 1
        if due:
            self.tick(due)
        self.loop.call_at(self.next, self._timer)

    def stop(self) -> None:
        self.state = Client.CLOSED
        if self.fd is not None:
            self.loop.unregister(self)
            os.close(self.fd)
            self.fd = None


class Loop:
    """An epoll loop over the clients of one process, with timers and per-turn hooks."""

    def __init__(self, buffer_size: int = 1 << 20, ca: str | None = None) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self.buffer = bytearray(buffer_size)
        self.view = memoryview(self.buffer)
        self.measuring = False
        self.parse_all = False
        self.now = now_ns()
        self.hooks: list[Callable[[], None]] = []
        self.busy: Callable[[], bool] | None = None
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._timer_ids = 0
        self.ca = ca
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def tls_context(self, alpn: bool) -> ssl.SSLContext:
        context = self._contexts.get(alpn)
        if context is None:
            context = ssl.create_default_context(cafile=self.ca)
            if alpn:
                context.set_alpn_protocols(["http/1.1"])
            self._contexts[alpn] = context
        return context

    def register(self, client: Client | Ticker, events: int) -> None:
        fd = client.fd
        assert fd is not None and fd >= 0
        self.handlers[fd] = client
        self._callbacks[fd] = client.handle
        self.epoll.register(fd, events)
        if isinstance(client, Client):
            client._events = events

    def register_fd(self, fd: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self._callbacks[fd] = handler
        self.epoll.register(fd, select.EPOLLIN)

    def modify(self, client: Client, events: int) -> None:
        if client.fd < 0 or client.state == Client.CLOSED:
            return
        client._events = events
        try:
            self.epoll.modify(client.fd, events)
        except (FileNotFoundError, ValueError):
            self.register(client, events)

    def unregister(self, client: Client | Ticker) -> None:
        fd = client.fd
        if fd is None or fd < 0 or self.handlers.get(fd) is not client:
            return
        del self.handlers[fd]
        del self._callbacks[fd]
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(fd)

    def call_at(self, when: int, function: Callable[[], None]) -> None:
        self._timer_ids += 1
        heapq.heappush(self._timers, (when, self._timer_ids, function))

    def run_until(self, done: Callable[[], bool], deadline: int) -> bool:
        """Run until ``done()`` (True) or the monotonic ``deadline`` in ns (False)."""
        poll = self.epoll.poll
        callbacks = self._callbacks
        timers = self._timers
        hooks = self.hooks
        while True:
            now = self.now = now_ns()
            while timers and timers[0][0] <= now:
                heapq.heappop(timers)[2]()
                now = self.now = now_ns()
            if done():
                return True
            if now >= deadline:
                return False
            wake = min(deadline, timers[0][0]) if timers else deadline
            # Hooks that still have work (a flooding publisher) keep the loop from sleeping.
            timeout = 0.0 if self._busy() else max(0.0, (wake - now) / 1e9)
            for fd, mask in poll(min(timeout, 0.05)):
                callback = callbacks.get(fd)
                if callback is not None:
                    self.now = now_ns()
                    callback(mask)
            for hook in hooks:
                hook()

    def _busy(self) -> bool:
        return self.busy() if self.busy is not None else False

    def close(self) -> None:
        self.epoll.close()
