"""One listener as a Twisted service: where it listens, TLS around it, and its reload path.

Every listener type is a ``ListenerService``: it opens its port (an endpoint
string, ``host``/``port``, or a port shared with other workers through
``SO_REUSEPORT``) when started, wraps its factory in TLS when its config has
certificate material, and takes every config reload through one
``reconfigure(config, limits)``. Transports only say which factory serves a
connection (``protocol_factory``) and what a reload changes beyond the shared
settings (``configure``).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.config.listeners import LISTEN_BACKLOG, ListenerConfig, StreamListenerConfig
from gateway.config.settings import Limits
from gateway.tls.files import TlsFileError, TlsSettings
from gateway.tls.server import ServerTls
from gateway.tls.through import ThroughTLSProtocol
from gateway.transports.address import host_port
from gateway.transports.runtime import ListenerRuntime


class ReloadableTls(Protocol):
    """A listener's certificate material that a reload re-reads (``ServerTls``, and the
    DTLS listener's)."""

    settings: TlsSettings

    @property
    def fingerprint(self) -> str: ...

    def reload(self) -> None: ...


class ListenError(Exception):
    """A listener could not bind; ``str()`` is the message for the user."""


def cannot_listen(where: str, error: BaseException) -> str:
    """``cannot listen on WHERE: Address already in use`` (the OS's words when it has them)."""
    reason = getattr(error, "socketError", None) or error
    return f"cannot listen on {where}: {getattr(reason, 'strerror', None) or reason}"


class ListenerService(Service):
    """One listener of the gateway; the ``GatewayService`` has one per ``[[listeners]]``."""

    log = Logger()

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.name = runtime.config.name
        self.port: IListeningPort | None = None
        self.where = ""
        self.server_tls: ReloadableTls | None = None
        # What the port serves each connection with (under TLS, the TLS factory).
        self.factory: Any = None
        # Set by a worker process: listen on a port the other workers share.
        self.reuse_port = False

    @property
    def config(self) -> ListenerConfig:
        return self.runtime.config

    # What each transport provides

    def protocol_factory(self) -> IProtocolFactory:
        """The factory that serves one connection (stream listeners)."""
        raise NotImplementedError

    def configure(self) -> None:
        """Apply ``runtime.config`` and ``runtime.limits`` beyond what the runtime holds."""

    async def open(self, reactor: Any) -> IListeningPort:
        """Open the listening port (stream listeners: the factory, under TLS if secure)."""
        config = self.config
        assert isinstance(config, StreamListenerConfig)
        factory: Any = self.protocol_factory()
        tls = config.tls_settings
        if tls is not None:
            try:
                server_tls = ServerTls(tls)
            except TlsFileError as e:
                raise ListenError(f'listener "{config.name}": {e.key}: {e.problem}') from e
            self.server_tls = server_tls
            # Outside the site, never between TLS and the site (Autobahn needs that).
            factory = TLSMemoryBIOFactory(server_tls, False, factory, reactor)
            # Without Twisted's small-write aggregation (its default protocol copies every
            # write and holds small ones a loop turn): peers get one write per batch, sent
            # at once while the socket is idle.
            factory.protocol = ThroughTLSProtocol
            factory.noisy = False
        self.factory = factory
        if self.reuse_port:
            return listen_shared_stream(reactor, config, factory)
        port: IListeningPort = await _endpoint(reactor, config).listen(factory)
        return port

    # Lifecycle

    async def listen(self, reactor: Any) -> None:
        """Open the port; raises ``ListenError`` with the message for the user."""
        if self.port is not None:
            return
        config = self.config
        try:
            self.port = await self.open(reactor)
        except ListenError:
            raise
        except Exception as e:
            where = f'{config.type} {configured_where(config)} (listener "{config.name}")'
            raise ListenError(cannot_listen(where, e)) from e
        if isinstance(config, StreamListenerConfig) and config.endpoint is not None:
            self.where = f"endpoint {config.endpoint}"
        else:
            address: Any = self.port.getHost()
            self.where = host_port(address.host, address.port)

    def describe(self) -> str:
        """What the ``listening ...`` log line says about this listener."""
        config = self.config
        return f'{config.type} {self.where} (listener "{config.name}", channel "{config.channel}")'

    async def stop_listening(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            result = port.stopListening()
            if isinstance(result, Deferred):
                await result

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self.stop_listening())

    # Reload and drain

    def reconfigure(self, config: ListenerConfig, limits: Limits) -> None:
        """A config reload: new settings for new connections, and fresh TLS material."""
        self.runtime.reconfigure(config, limits)
        self.configure()
        tls = config.tls_settings
        if self.server_tls is not None and tls is not None:
            self._reload_tls(tls)

    def _reload_tls(self, settings: Any) -> None:
        server_tls = self.server_tls
        assert server_tls is not None
        previous = server_tls.settings
        server_tls.settings = settings
        try:
            server_tls.reload()
        except TlsFileError as e:
            server_tls.settings = previous
            self.log.error(
                'listener "{listener}": reload failed, keeping the current certificate: '
                "{key}: {problem}",
                listener=self.name,
                key=e.key,
                problem=e.problem,
            )
        else:
            self.log.info(
                'listener "{listener}": reloaded TLS material (certificate SHA-256 {fingerprint})',
                listener=self.name,
                fingerprint=server_tls.fingerprint,
            )

    def peer_count(self) -> int | None:
        """Peers a datagram listener knows (None: stream listeners count connections)."""
        return None


def configured_where(config: ListenerConfig) -> str:
    if isinstance(config, StreamListenerConfig) and config.endpoint is not None:
        return f"endpoint {config.endpoint}"
    return host_port(config.host, config.port)


def _endpoint(reactor: Any, config: StreamListenerConfig) -> Any:
    if config.endpoint is not None:
        return serverFromString(reactor, config.endpoint)
    endpoint_type = (
        TCP6ServerEndpoint if ipaddress.ip_address(config.host).version == 6 else TCP4ServerEndpoint
    )
    return endpoint_type(reactor, config.port, backlog=LISTEN_BACKLOG, interface=config.host)


# Ports shared by worker processes


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def shared_socket(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket bound to ``host:port`` with ``SO_REUSEPORT`` set."""
    sock = socket.socket(_family(host), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_shared_stream(
    reactor: Any, config: StreamListenerConfig, factory: IProtocolFactory
) -> IListeningPort:
    """Listen for ``config`` on a port other workers share (``SO_REUSEPORT``)."""
    if config.endpoint is not None:
        raise ValueError(
            "workers share host/port listeners only; an endpoint listener cannot be shared"
        )
    sock = shared_socket(config.host, config.port, socket.SOCK_STREAM)
    try:
        sock.listen(LISTEN_BACKLOG)  # the same as single-process listeners
        port: IListeningPort = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()  # the reactor adopted a duplicate of the descriptor
    return port


def listen_shared_datagram(
    reactor: Any, config: ListenerConfig, protocol: Any, max_packet_size: int
) -> IListeningPort:
    """A UDP port for ``config`` that other workers share (``SO_REUSEPORT``)."""
    sock = shared_socket(config.host, config.port, socket.SOCK_DGRAM)
    try:
        port: IListeningPort = reactor.adoptDatagramPort(
            sock.fileno(), sock.family, protocol, max_packet_size
        )
    finally:
        sock.close()
    return port
