"""From a ``Config`` to a running gateway: the bus plus one port per listener."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.address import host_port
from gateway.bus import Bus
from gateway.config import (
    WEBSOCKET_TYPES,
    Config,
    DatagramListenerConfig,
    ListenerConfig,
    StreamListenerConfig,
)
from gateway.flow import FlowContext
from gateway.metrics import Metrics
from gateway.pki import PkiError, ensure_dev_server_cert
from gateway.tcp import LineFactory
from gateway.tls import ServerTls, TlsFileError
from gateway.udp import DatagramListener
from gateway.websocket import make_site


@dataclass(frozen=True)
class Bound:
    """A listener that is listening, and the address it actually got."""

    listener: ListenerConfig
    port: IListeningPort
    host: str
    port_number: int

    def describe(self) -> str:
        return (
            f"{self.listener.type} {host_port(self.host, self.port_number)} "
            f'(listener "{self.listener.name}", channel "{self.listener.channel}")'
        )


class ListenError(Exception):
    """A listener could not bind; ``str()`` is the message for the user."""


class GatewayService(MultiService):
    """The whole gateway. ``listen()`` binds every listener; stopping closes peers."""

    log = Logger()

    def __init__(self, config: Config, reactor: Any, shutdown_grace: float = 3.0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        self.shutdown_grace = shutdown_grace
        self.metrics = Metrics()
        self.bus = Bus(self.metrics)
        self.flow = FlowContext(config.limits, self.metrics, reactor)
        self.bound: list[Bound] = []
        # Each stream listener's open connections (attached or still handshaking);
        # shutdown waits for them, then aborts what is left.
        self.connection_sets: list[set[Any]] = []
        self.tls: dict[str, ServerTls] = {}

    async def listen(self) -> list[Bound]:
        """Bind every listener, or none: on the first failure the others are closed."""
        try:
            self._generate_dev_certs()
            for listener in self.config.listeners:
                self.bound.append(await self._listen_one(listener))
        except ListenError:
            await self._stop_listening()
            raise
        for bound in self.bound:
            self.log.info("listening {what}", what=bound.describe())
        return self.bound

    async def _listen_one(self, listener: ListenerConfig) -> Bound:
        try:
            port = await self._open(listener)
        except ListenError:
            raise
        except Exception as e:
            where = host_port(listener.host, listener.port)
            reason = getattr(e, "socketError", None) or e
            raise ListenError(
                f'cannot listen on {listener.type} {where} (listener "{listener.name}"): '
                f"{getattr(reason, 'strerror', None) or reason}"
            ) from e
        address: Any = port.getHost()
        return Bound(listener, port, address.host, address.port)

    async def _open(self, listener: ListenerConfig) -> IListeningPort:
        limits = self.config.limits
        if isinstance(listener, StreamListenerConfig):
            endpoint_type = (
                TCP6ServerEndpoint
                if ipaddress.ip_address(listener.host).version == 6
                else TCP4ServerEndpoint
            )
            endpoint = endpoint_type(self.reactor, listener.port, interface=listener.host)
            secure = listener.tls is not None
            factory: Any
            if listener.type in WEBSOCKET_TYPES:
                site = make_site(self.bus, listener, limits, self.config.gateway.name, self.reactor)
                self.connection_sets.append(site.connections)
                factory = site
            else:
                line_factory = LineFactory(
                    self.bus,
                    listener,
                    limits,
                    self.config.gateway.name,
                    self.reactor,
                    transport_name=listener.type,
                    handshake_timeout=limits.handshake_timeout if secure else None,
                    flow=self.flow,
                )
                self.connection_sets.append(line_factory.connections)
                factory = line_factory
            if listener.tls is not None:
                # Outside the site, never between TLS and the site (Autobahn needs that).
                server_tls = self._server_tls(listener)
                factory = TLSMemoryBIOFactory(server_tls, False, factory, self.reactor)
                factory.noisy = False
            port: IListeningPort = await endpoint.listen(factory)  # type: ignore[no-untyped-call]
            return port
        assert isinstance(listener, DatagramListenerConfig)
        protocol = DatagramListener(self.bus, listener, limits, self.reactor)
        udp_port: IListeningPort = self.reactor.listenUDP(
            listener.port,
            protocol,
            interface=listener.host,
            maxPacketSize=protocol.read_size,
        )
        return udp_port

    def _generate_dev_certs(self) -> None:
        """Make missing dev certificates first: listeners may share them."""
        for listener in self.config.listeners:
            if not isinstance(listener, StreamListenerConfig) or listener.tls is None:
                continue
            settings = listener.tls
            if not settings.generate_dev_cert:
                continue
            try:
                made = ensure_dev_server_cert(settings.cert, settings.key)
            except PkiError as e:
                raise ListenError(f'listener "{listener.name}": generate_dev_cert: {e}') from e
            if made is not None:
                self.log.info(
                    'listener "{listener}": created a dev certificate {cert} and key {key}, '
                    "signed by the dev CA {ca} (SHA-256 fingerprint {fingerprint}); "
                    "clients trust it with that ca.pem",
                    listener=listener.name,
                    cert=str(made.cert),
                    key=str(made.key),
                    ca=str(made.ca_cert),
                    fingerprint=made.ca_fingerprint,
                )

    def _server_tls(self, listener: StreamListenerConfig) -> ServerTls:
        settings = listener.tls
        assert settings is not None
        try:
            server_tls = ServerTls(settings)
        except TlsFileError as e:
            raise ListenError(f'listener "{listener.name}": {e.key}: {e.problem}') from e
        self.tls[listener.name] = server_tls
        return server_tls

    def reload_tls(self) -> None:
        """Re-read every TLS listener's certificate, key and CA (SIGHUP).

        New connections get the new material; open ones keep theirs. A bad
        file is logged and the listener keeps what it had.
        """
        for name, server_tls in self.tls.items():
            try:
                server_tls.reload()
            except TlsFileError as e:
                self.log.error(
                    'listener "{listener}": reload failed, keeping the current certificate: '
                    "{key}: {problem}",
                    listener=name,
                    key=e.key,
                    problem=e.problem,
                )
            else:
                self.log.info(
                    'listener "{listener}": reloaded TLS material (certificate SHA-256 {fingerprint})',
                    listener=name,
                    fingerprint=server_tls.fingerprint,
                )

    async def _stop_listening(self) -> None:
        stopping = [Deferred.fromCoroutine(_stop(bound.port)) for bound in self.bound]
        self.bound = []
        await DeferredList(stopping)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        """Stop accepting, close every peer, wait a little for them to go."""
        self.log.info("shutting down: closing {count} peers", count=self.bus.peer_count)
        await self._stop_listening()
        self.bus.close_all("gateway shutting down")
        deadline = self.reactor.seconds() + self.shutdown_grace
        while self._open_connections() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        for connections in self.connection_sets:
            for connection in list(connections):
                connection.abort("gateway shutting down")
        self.log.info("stopped")

    def _open_connections(self) -> int:
        return sum(len(connections) for connections in self.connection_sets)


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
