"""The client ends of in-memory connections, and the connections between them and the gateway."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from gateway.core.interfaces import IPeer
from gateway.testing.reactor import MemoryDatagramPort

if TYPE_CHECKING:
    from gateway.testing import MemoryGateway


@implementer(IHandshakeListener)
class LineClient(Protocol):
    """The client end of a tcp/tls connection: collects what it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.handshake_done = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.lost = reason


class WebSocketClient(WebSocketClientProtocol):
    """The client end of a ws/wss connection (Autobahn's client): collects messages."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.messages: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None, str | None] | None = None
        self.pings = 0

    def onOpen(self) -> None:
        self.opened = True

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)  # answers with a pong

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        self.messages.append((payload, is_binary))

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (was_clean, code, reason)

    def texts(self) -> list[str]:
        """Text messages received so far, decoded."""
        return [payload.decode() for payload, binary in self.messages if not binary]

    def events(self) -> list[dict[str, Any]]:
        """Text messages received so far, as JSON (the ``gateway.v1.json`` subprotocol)."""
        return [json.loads(text) for text in self.texts()]

    def take(self) -> list[tuple[bytes, bool]]:
        """The messages received since the last ``take``."""
        messages, self.messages = self.messages, []
        return messages


class ServerTransport(iosim.FakeTransport):
    """The gateway's end of an in-memory connection: honours pausing (the gateway
    stops reading a client) and aborts (what was not sent is discarded)."""

    def __init__(self, protocol: Any, peer: IPv4Address | IPv6Address) -> None:
        super().__init__(protocol, isServer=True, peerAddress=peer)  # type: ignore[no-untyped-call]
        self.reading = True
        self.aborted = False

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.stream = []
        self.tlsbuf = []
        super().abortConnection()  # type: ignore[no-untyped-call]


class Given(ClientFactory):
    """Hands out one protocol that already exists (and leaves its ``factory`` alone)."""

    def __init__(self, protocol: Any) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol_instance


class StreamConnection:
    """One client connected to a stream listener, and the gateway's end of it."""

    def __init__(
        self,
        gateway: MemoryGateway,
        client: Any,
        pump: iosim.IOPump,
        server_io: ServerTransport,
        client_io: iosim.FakeTransport,
    ) -> None:
        self.gateway = gateway
        self.client = client
        self.pump = pump
        self.server_io = server_io
        self.client_io = client_io
        self.stalled = False

    @property
    def reading(self) -> bool:
        """Whether the gateway reads from this client (False while it paused it:
        backpressure, or the client's rate limit)."""
        return self.server_io.reading

    def move(self) -> bool:
        """Move what is waiting one step, as a network would; True if anything moved.

        Nothing reaches a stalled client; nothing reaches the gateway while it
        does not read this client.
        """
        server_io: Any = self.server_io
        client_io: Any = self.client_io
        client_io._checkProducer()
        server_io._checkProducer()
        to_client = b"" if self.stalled else server_io.getOutBuffer()
        to_server = client_io.getOutBuffer() if server_io.reading else b""
        if to_server:
            server_io.bufferReceived(to_server)
        if to_client:
            client_io.bufferReceived(to_client)
        if to_server or to_client:
            return True
        if server_io.disconnecting and not server_io.disconnected:
            if self.stalled and not server_io.aborted and server_io.stream:
                return False  # the gateway waits for the client to read
            server_io.disconnected = True
            client_io.disconnecting = True
            client_io.reportDisconnect()
            return True
        if client_io.disconnecting and not client_io.disconnected:
            if client_io.stream and not server_io.reading:
                return False
            client_io.disconnected = True
            server_io.disconnecting = True
            server_io.reportDisconnect()
            return True
        return False

    @property
    def server_protocol(self) -> Any:
        """The gateway's protocol of this connection (under TLS, the TLS layer's inner one)."""
        protocol = self.server_io.protocol
        return getattr(protocol, "wrappedProtocol", protocol)

    @property
    def peer(self) -> IPeer:
        """The gateway's peer for this connection (a WebSocket peer once upgraded)."""
        protocol = self.server_protocol
        upgraded = getattr(protocol, "transport", None)
        inner = getattr(upgraded, "protocol", None) if upgraded is not None else None
        peer = inner if IPeer.providedBy(inner) else protocol
        assert IPeer.providedBy(peer), f"{peer!r} is not a peer (yet)"
        return peer

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (both ends know)."""
        return bool(self.server_io.disconnected or self.client_io.disconnected)

    @property
    def closing(self) -> bool:
        """Whether the gateway has closed (or aborted) its end, even if the client
        has not noticed yet (a stalled client)."""
        return bool(self.server_io.disconnecting or self.server_io.disconnected)

    def send(self, data: bytes) -> None:
        """Bytes from the client (tcp, tls), delivered at once."""
        self.client.transport.write(data)  # the fake socket, or the TLS layer above it
        self.gateway.flush()

    def received(self) -> bytes:
        """All bytes the client has received (tcp, tls)."""
        data: bytes = self.client.received
        return data

    def lines(self) -> list[bytes]:
        """Complete lines received and not yet taken (tcp, tls)."""
        data: bytes = self.client.received
        *lines, rest = data.split(b"\n")
        self.client.received = rest
        return lines

    def stall(self) -> None:
        """The client stops reading: nothing more reaches it, and the gateway's
        transport says it is full (as Twisted does at 64 KiB)."""
        self.stalled = True
        producer = self.server_io.producer
        if producer is not None:
            producer.pauseProducing()

    def unstall(self) -> None:
        """The client reads again: its backlog drains."""
        self.stalled = False
        producer = self.server_io.producer
        self.gateway.flush()
        if producer is not None and self.server_io.producer is producer:
            producer.resumeProducing()  # type: ignore[union-attr]
        self.gateway.flush()

    def close(self) -> None:
        """The client closes its end."""
        self.client_io.loseConnection()
        self.gateway.flush()


class DatagramPort:
    """Datagrams in and out of one UDP listener."""

    def __init__(self, gateway: MemoryGateway, port: MemoryDatagramPort) -> None:
        self.gateway = gateway
        self.port = port

    def send(self, datagram: bytes, source: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        """A datagram from ``source`` arrives at the listener."""
        self.port.protocol.datagramReceived(datagram, source)
        self.gateway.flush()

    def received(self, source: tuple[str, int] = ("127.0.0.1", 50000)) -> list[bytes]:
        """Datagrams the listener sent to ``source`` and not yet taken."""
        mine = [datagram for datagram, to in self.port.written if to == source]
        self.port.written = [(d, to) for d, to in self.port.written if to != source]
        return mine
