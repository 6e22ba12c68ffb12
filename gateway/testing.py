"""An in-memory gateway for tests: the real ``GatewayService``, no sockets, no waiting.

``MemoryGateway`` runs a gateway from a TOML string (or a ``Config``) on a
``MemoryReactorClock``. Clients connect over ``twisted.test.iosim``, so every
byte goes through the same protocols, TLS layers, limits and timers as in a
real process, and time only moves when the test says so::

    from gateway.testing import MemoryGateway

    gateway = MemoryGateway('''
        [[listeners]]
        name = "tcp"
        type = "tcp"
        port = 8006
        [[listeners]]
        name = "ws"
        type = "ws"
        port = 8080
    ''')
    line = gateway.connect("tcp")
    browser = gateway.websocket("ws")
    line.send(b"hello\\n")
    assert browser.texts() == ["hello"]
    gateway.advance(30)            # timers on the injected clock
    gateway.stop()                 # the graceful drain

``connect`` works for ``tcp`` and ``tls`` listeners (TLS clients trust the
listener's dev CA, or ``ca=``), ``websocket`` for ``ws`` and ``wss``,
``datagrams`` for ``udp``. ``logged`` looks at what the gateway logged, as
``twisted.logger`` events, never as scraped text. ``FakeBackplane`` stands in
for the Redis backplane of a cluster.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from gateway.config.load import parse
from gateway.config.reload import restart_needed, without_restart_changes
from gateway.config.settings import Config
from gateway.core.bus import Bus
from gateway.core.interfaces import IPeer
from gateway.core.message import Batch, Origin
from gateway.server import GatewayService
from gateway.transports.listening import ListenerService

__all__ = [
    "DatagramPort",
    "FakeBackplane",
    "LineClient",
    "MemoryGateway",
    "StreamConnection",
    "WebSocketClient",
]


class _MemoryDatagramPort:
    """What ``listenUDP`` returns on the memory reactor: records what the protocol sends."""

    def __init__(self, protocol: DatagramProtocol, interface: str, port: int) -> None:
        self.protocol = protocol
        family = IPv6Address if ":" in interface else IPv4Address
        self.address = family("UDP", interface or "0.0.0.0", port)
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.written.append((datagram, (address[0], address[1])))

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address

    def stopListening(self) -> None:
        self.protocol.doStop()


class GatewayReactor(MemoryReactorClock):
    """``MemoryReactorClock`` with the UDP ports a gateway needs."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.udp_ports: list[_MemoryDatagramPort] = []

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> _MemoryDatagramPort:
        udp = _MemoryDatagramPort(protocol, interface, port)
        self.udp_ports.append(udp)
        protocol.makeConnection(udp)  # type: ignore[arg-type]
        return udp


@implementer(ILogObserver)
class _LogCapture:
    def __init__(self, limit: int = 100_000) -> None:
        self.events: list[LogEvent] = []
        self.limit = limit

    def __call__(self, event: LogEvent) -> None:
        if len(self.events) < self.limit:
            self.events.append(event)


class FakeBackplane:
    """Stands in for the cluster backplane: records what the bus forwards, and plays
    batches and presence "from other nodes" into it."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.forwarded: list[Batch] = []
        self.presence_events: list[tuple[str, str, str]] = []
        bus.backplane = self

    def forward(self, batch: Batch) -> None:
        self.forwarded.append(batch)

    def presence(self, event: str, origin: Origin, channel: str) -> None:
        self.presence_events.append((event, origin.peer_id, channel))

    def remote_message(
        self, payload: bytes, channel: str = "main", peer: str = "remote-1", node: str = "other"
    ) -> int:
        """A message from a peer of another node; returns the local receivers reached."""
        origin = Origin(peer, node, "remote")
        return self.bus.publish_remote(Batch(origin, channel, [payload]))


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

    def onOpen(self) -> None:
        self.opened = True

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


class StreamConnection:
    """One client connected to a stream listener, and the gateway's end of it."""

    def __init__(
        self,
        gateway: MemoryGateway,
        client: Any,
        pump: iosim.IOPump,
        server_io: iosim.FakeTransport,
        client_io: iosim.FakeTransport,
    ) -> None:
        self.gateway = gateway
        self.client = client
        self.pump = pump
        self.server_io = server_io
        self.client_io = client_io
        self.stalled = False

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
        """Whether the connection is gone."""
        return bool(self.server_io.disconnected or self.client_io.disconnected)

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

    def __init__(self, gateway: MemoryGateway, port: _MemoryDatagramPort) -> None:
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


class MemoryGateway:
    """A whole gateway in memory, started (listening) once built.

    ``config`` is TOML text or a ``Config``; relative certificate paths in TOML
    are resolved from ``base`` (default: the current folder).
    """

    def __init__(
        self,
        config: str | Config,
        base: Path | None = None,
        backplane: bool = False,
        start: bool = True,
    ) -> None:
        self.base = base if base is not None else Path.cwd()
        self.config = self._parse(config) if isinstance(config, str) else config
        self.reactor = GatewayReactor()
        self._capture = _LogCapture()
        globalLogPublisher.addObserver(self._capture)
        self.service = GatewayService(self.config, self.reactor)
        self.backplane = FakeBackplane(self.service.bus) if backplane else None
        self._pumps: list[iosim.IOPump] = []
        self._connections: list[StreamConnection] = []
        self._ports = itertools.count(40000)
        self._stopped = False
        if start:
            self.start()

    def _parse(self, text: str) -> Config:
        return parse(tomllib.loads(text), "<memory>", self.base / "gateway.toml")

    @property
    def bus(self) -> Bus:
        return self.service.bus

    def listener(self, name: str) -> ListenerService:
        return self.service.listeners[name]

    def start(self) -> None:
        """Listen on every listener and start the service, as ``gateway --config`` does."""
        listening = Deferred.fromCoroutine(self.service.listen())
        failures: list[Failure] = []
        listening.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        self.service.startService()  # type: ignore[no-untyped-call]

    # Time

    def flush(self) -> None:
        """Move every byte that is waiting, in both directions, on every connection."""
        for _ in range(1000):
            moved = False
            for connection in self._connections:
                if connection.stalled:
                    continue
                if connection.pump.pump():
                    moved = True
            if not moved:
                return

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let ``seconds`` pass on the gateway's clock, in ``step``s, moving bytes between."""
        remaining = seconds
        while remaining > 1e-12:
            delta = min(step, remaining)
            self.reactor.advance(delta)
            self.flush()
            remaining -= delta

    # Clients

    def _address(self, host: str) -> IPv4Address | IPv6Address:
        family = IPv6Address if ":" in host else IPv4Address
        return family("TCP", host, next(self._ports))

    def _open(self, listener: str, client: Any, host: str, tls: Any = None) -> StreamConnection:
        factory = self.listener(listener).factory
        assert factory is not None, f"listener {listener!r} is not a listening stream listener"
        address = self._address(host)
        server = factory.buildProtocol(address)
        end = client
        if tls is not None:
            wrapper = TLSMemoryBIOFactory(tls, True, ClientFactory.forProtocol(lambda: client))
            end = wrapper.buildProtocol(address)
        server_io = iosim.FakeTransport(server, isServer=True, peerAddress=address)
        client_io = iosim.FakeTransport(end, isServer=False, hostAddress=address)
        pump = iosim.connect(server, server_io, end, client_io, greet=False, clock=self.reactor)
        connection = StreamConnection(self, client, pump, server_io, client_io)
        self._connections.append(connection)
        self.flush()
        return connection

    def connect(
        self, listener: str, host: str = "127.0.0.1", ca: Path | None = None
    ) -> StreamConnection:
        """A line client on a ``tcp`` or ``tls`` listener; ``host`` is its source address."""
        config = self.listener(listener).config
        tls = config.tls_settings
        client = LineClient()
        creator = None
        if tls is not None:
            ca_path = ca if ca is not None else tls.cert.parent / "ca.pem"
            authority = Certificate.loadPEM(ca_path.read_bytes())
            creator = optionsForClientTLS("localhost", trustRoot=authority)
        return self._open(listener, client, host, creator)

    def websocket(
        self,
        listener: str,
        path: str = "/ws",
        protocols: list[str] | None = None,
        origin: str | None = None,
        host: str = "127.0.0.1",
        ca: Path | None = None,
    ) -> WebSocketClient:
        """A WebSocket client on a ``ws`` or ``wss`` listener (``protocols``: subprotocols)."""
        connection = self.websocket_connection(listener, path, protocols, origin, host, ca)
        client: WebSocketClient = connection.client
        return client

    def websocket_connection(
        self,
        listener: str,
        path: str = "/ws",
        protocols: list[str] | None = None,
        origin: str | None = None,
        host: str = "127.0.0.1",
        ca: Path | None = None,
    ) -> StreamConnection:
        """As ``websocket``, with the connection (to stall it, or to find its peer)."""
        config = self.listener(listener).config
        tls = config.tls_settings
        scheme = "wss" if tls is not None else "ws"
        factory = WebSocketClientFactory(
            url=f"{scheme}://localhost:{config.port}{path}",
            origin=origin,
            protocols=protocols or [],
            reactor=self.reactor,
        )
        factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
        )
        factory.protocol = WebSocketClient
        client = factory.buildProtocol(None)
        creator = None
        if tls is not None:
            ca_path = ca if ca is not None else tls.cert.parent / "ca.pem"
            creator = optionsForClientTLS(
                "localhost", trustRoot=Certificate.loadPEM(ca_path.read_bytes())
            )
        return self._open(listener, client, host, creator)

    def http(self, listener: str, request: bytes, host: str = "127.0.0.1") -> StringTransport:
        """Raw HTTP bytes on a new connection of a ``ws`` listener; the transport holds the reply."""
        factory = self.listener(listener).factory
        assert factory is not None
        address = self._address(host)
        channel = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        transport.protocol = channel  # type: ignore[attr-defined]  # as on a real transport
        channel.makeConnection(transport)
        if request:
            channel.dataReceived(request)
        return transport

    def datagrams(self, listener: str) -> DatagramPort:
        """The UDP port of a ``udp`` listener."""
        for port in self.reactor.udp_ports:
            if port.protocol is getattr(self.listener(listener), "server", None):
                return DatagramPort(self, port)
        raise KeyError(f"{listener!r} is not a listening udp listener")

    # Operations

    def reload(self, config: str | Config) -> list[str]:
        """Apply a new configuration as SIGHUP does; returns what needs a restart."""
        new = self._parse(config) if isinstance(config, str) else config
        restart = restart_needed(self.service.config, new)
        self.service.apply(without_restart_changes(self.service.config, new))
        self.flush()
        return restart

    def stop(self, limit: float = 3600.0) -> bool:
        """Stop as SIGTERM does (the drain), moving time until it ends; True once stopped."""
        if self._stopped:
            return True
        stopping = self.service.stopService()
        done: list[object] = []
        stopping.addBoth(done.append)
        waited = 0.0
        while not done and waited < limit:
            self.advance(0.05)
            waited += 0.05
        self._stopped = bool(done)
        globalLogPublisher.removeObserver(self._capture)
        if done and isinstance(done[0], Failure):
            done[0].raiseException()
        return self._stopped

    def peers(self) -> list[IPeer]:
        """The attached peers, in the order they joined."""
        return self.bus.attached()

    # Logs

    def log_events(self) -> Iterator[LogEvent]:
        """Every event logged since the gateway was built."""
        return iter(list(self._capture.events))

    def logged(self, pattern: str) -> list[str]:
        """The formatted log messages matching the regular expression ``pattern``."""
        regex = re.compile(pattern)
        messages = (formatEvent(event) for event in self._capture.events)
        return [message for message in messages if regex.search(message)]
