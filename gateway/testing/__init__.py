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
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from gateway.auth.verifier import Verifier, inline_runner
from gateway.config.load import parse
from gateway.config.reload import restart_needed, without_restart_changes
from gateway.config.settings import Config
from gateway.core.bus import Bus
from gateway.core.interfaces import IPeer
from gateway.server import GatewayService
from gateway.stores.durable import inline_runner as inline_work_runner
from gateway.testing.clients import (
    DatagramPort,
    Given,
    LineClient,
    ServerTransport,
    StreamConnection,
    WebSocketClient,
)
from gateway.testing.reactor import FakeBackplane, GatewayReactor, LogCapture
from gateway.transports.listening import ListenerService

__all__ = [
    "DatagramPort",
    "FakeBackplane",
    "LineClient",
    "MemoryGateway",
    "StreamConnection",
    "WebSocketClient",
]


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
        self._capture = LogCapture()
        globalLogPublisher.addObserver(self._capture)
        # Password hashes are checked, and an sqlite history file written, at once (no
        # threads on a memory reactor: writes happen when the clock moves, ``flush``).
        self.service = GatewayService(
            self.config,
            self.reactor,
            verifier=Verifier(inline_runner()),
            history_runner=inline_work_runner(),
        )
        self.backplane = FakeBackplane(self.service.bus, self.flush) if backplane else None
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
        """The service of the listener called ``name`` — or of the only listener of type
        ``name`` (so ``connect("tls")`` works whatever the listener is called)."""
        listeners = self.service.listeners
        if name in listeners:
            return listeners[name]
        of_type = [service for service in listeners.values() if service.config.type == name]
        if len(of_type) != 1:
            raise KeyError(f"no listener called {name!r}, and not exactly one of type {name!r}")
        return of_type[0]

    def start(self) -> None:
        """Listen on every listener and start the service, as ``gateway --config`` does."""
        listening = Deferred.fromCoroutine(self.service.listen())
        failures: list[Failure] = []
        listening.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        self.service.startService()

    # Time

    def flush(self) -> None:
        """Move every byte that is waiting, in both directions, on every connection."""
        for _ in range(10_000):
            self.reactor.advance(0)
            moved = False
            for connection in list(self._connections):
                if connection.move():
                    moved = True
            if not moved:
                break
        self._connections = [c for c in self._connections if not c.server_io.disconnected]

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
            wrapper = TLSMemoryBIOFactory(tls, True, Given(client), self.reactor)
            end = wrapper.buildProtocol(address)
        server_io = ServerTransport(server, address)
        client_io = iosim.FakeTransport(end, isServer=False, hostAddress=address)
        pump = iosim.connect(server, server_io, end, client_io, greet=False, clock=self.reactor)
        connection = StreamConnection(self, client, pump, server_io, client_io)
        self._connections.append(connection)
        self.flush()
        return connection

    def connect(
        self, listener: str, host: str = "127.0.0.1", ca: Path | None = None
    ) -> StreamConnection:
        """A client on a stream listener; ``host`` is its source address.

        On ``tcp``/``tls`` listeners the client is a ``LineClient``; on ``ws``/``wss``
        ones a ``WebSocketClient`` on ``/ws`` (``websocket_connection``).
        """
        config = self.listener(listener).config
        if config.type in ("ws", "wss"):
            return self.websocket_connection(listener, host=host, ca=ca)
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
