"""From a ``Config`` to a running gateway: the bus plus one port per listener."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.address import host_port
from gateway.admin import AdminSite
from gateway.bus import Bus
from gateway.config import (
    LISTEN_BACKLOG,
    WEBSOCKET_TYPES,
    Config,
    ConfigError,
    DatagramListenerConfig,
    ListenerConfig,
    StreamListenerConfig,
    TlsSettings,
    load,
)
from gateway.flow import FlowContext
from gateway.metrics import Metrics
from gateway.pki import PkiError, ensure_dev_server_cert
from gateway.tcp import LineFactory
from gateway.tls import ServerTls, TlsFileError
from gateway.udp import DatagramListener
from gateway.websocket import WebSocketSite, make_site
from gateway.workers import listen_shared_datagram, listen_shared_stream

if TYPE_CHECKING:
    from gateway.cluster import Backplane


@dataclass(frozen=True)
class Bound:
    """A listener that is listening, and where: ``host:port``, or its endpoint."""

    listener: ListenerConfig
    port: IListeningPort
    where: str

    def describe(self) -> str:
        return (
            f"{self.listener.type} {self.where} "
            f'(listener "{self.listener.name}", channel "{self.listener.channel}")'
        )


class ListenError(Exception):
    """A listener could not bind; ``str()`` is the message for the user."""


class GatewayService(MultiService):
    """The whole gateway. ``listen()`` binds every listener; stopping closes peers."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        reuse_port: bool = False,
        prepare: Callable[[Config], Config] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        # A worker process: listen on ports the other workers share (SO_REUSEPORT).
        self.reuse_port = reuse_port
        # What a reloaded file goes through before use (a worker's own ports and node id).
        self.prepare = prepare
        self.metrics = Metrics()
        self.bus = Bus(self.metrics, reactor)
        self.flow = FlowContext(config.limits, self.metrics, reactor)
        self.bound: list[Bound] = []
        self.admin_port: IListeningPort | None = None
        self.stopping = False
        # What a config reload may reconfigure, by listener name.
        self.line_factories: dict[str, LineFactory] = {}
        self.sites: dict[str, WebSocketSite] = {}
        self.datagram_listeners: dict[str, DatagramListener] = {}
        for name, channel in config.channels.items():
            self.bus.keep_history(name, channel.history)
        # Each stream listener's open connections (attached or still handshaking);
        # shutdown waits for them, then aborts what is left.
        self.connection_sets: list[set[Any]] = []
        self.tls: dict[str, ServerTls] = {}
        self.backplane: Backplane | None = None
        if config.cluster is not None:
            from gateway.cluster import Backplane  # the Redis client only when clustering

            self.backplane = Backplane(config.cluster, self.bus, reactor)
            self.bus.backplane = self.backplane
            self.backplane.setServiceParent(self)  # type: ignore[no-untyped-call]

    async def listen(self) -> list[Bound]:
        """Bind every listener, or none: on the first failure the others are closed."""
        try:
            self._generate_dev_certs()
            for listener in self.config.listeners:
                self.bound.append(await self._listen_one(listener))
        except ListenError:
            await self._stop_listening()
            raise
        await self._listen_admin()
        for bound in self.bound:
            self.log.info("listening {what}", what=bound.describe())
        if self.admin_port is not None:
            address: Any = self.admin_port.getHost()
            self.log.info(
                'listening admin {where} (listener "admin": /healthz /metrics /peers)',
                where=host_port(address.host, address.port),
            )
        return self.bound

    async def _listen_admin(self) -> None:
        admin = self.config.admin
        if admin is None:
            return
        try:
            self.admin_port = self.reactor.listenTCP(
                admin.port, AdminSite(self, self.reactor), interface=admin.host
            )
        except Exception as e:
            await self._stop_listening()
            reason = getattr(e, "socketError", None) or e
            raise ListenError(
                f"cannot listen on admin {host_port(admin.host, admin.port)}: "
                f"{getattr(reason, 'strerror', None) or reason}"
            ) from e

    async def _listen_one(self, listener: ListenerConfig) -> Bound:
        try:
            port = await self._open(listener)
        except ListenError:
            raise
        except Exception as e:
            where = _configured_where(listener)
            reason = getattr(e, "socketError", None) or e
            raise ListenError(
                f'cannot listen on {listener.type} {where} (listener "{listener.name}"): '
                f"{getattr(reason, 'strerror', None) or reason}"
            ) from e
        if isinstance(listener, StreamListenerConfig) and listener.endpoint is not None:
            return Bound(listener, port, f"endpoint {listener.endpoint}")
        address: Any = port.getHost()
        return Bound(listener, port, host_port(address.host, address.port))

    async def _open(self, listener: ListenerConfig) -> IListeningPort:
        limits = self.config.limits
        if isinstance(listener, StreamListenerConfig):
            endpoint = self._endpoint(listener)
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
                self.line_factories[listener.name] = line_factory
                self.connection_sets.append(line_factory.connections)
                factory = line_factory
            if listener.tls is not None:
                # Outside the site, never between TLS and the site (Autobahn needs that).
                server_tls = self._server_tls(listener)
                factory = TLSMemoryBIOFactory(server_tls, False, factory, self.reactor)
                factory.noisy = False
            if self.reuse_port:
                return listen_shared_stream(self.reactor, listener, factory)
            port: IListeningPort = await endpoint.listen(factory)
            return port
        assert isinstance(listener, DatagramListenerConfig)
        protocol = DatagramListener(self.bus, listener, limits, self.reactor)
        self.datagram_listeners[listener.name] = protocol
        if self.reuse_port:
            return listen_shared_datagram(self.reactor, listener, protocol, protocol.read_size)
        udp_port: IListeningPort = self.reactor.listenUDP(
            listener.port,
            protocol,
            interface=listener.host,
            maxPacketSize=protocol.read_size,
        )
        return udp_port

    def _endpoint(self, listener: StreamListenerConfig) -> Any:
        if listener.endpoint is not None:
            return serverFromString(self.reactor, listener.endpoint)
        endpoint_type = (
            TCP6ServerEndpoint
            if ipaddress.ip_address(listener.host).version == 6
            else TCP4ServerEndpoint
        )
        return endpoint_type(
            self.reactor, listener.port, backlog=LISTEN_BACKLOG, interface=listener.host
        )

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

    async def _stop_listening(self, admin: bool = True) -> None:
        ports = [bound.port for bound in self.bound]
        if admin and self.admin_port is not None:
            ports.append(self.admin_port)
            self.admin_port = None
        self.bound = []
        await DeferredList([Deferred.fromCoroutine(_stop(port)) for port in ports])

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        """Drain: stop accepting, close every peer after its queued output, then stop.

        WebSocket peers get close code 1001; stream peers' queued output is
        flushed for up to ``shutdown_timeout`` seconds before what is left is cut.
        """
        self.stopping = True
        self.log.info("shutting down: closing {count} peers", count=self.bus.peer_count)
        # The admin port stays up while draining: /healthz answers 503 meanwhile.
        await self._stop_listening(admin=False)
        for factory in self.line_factories.values():
            factory.draining = self.config.gateway.shutdown_timeout
        self.bus.close_all("gateway shutting down")
        deadline = self.reactor.seconds() + self.config.gateway.shutdown_timeout
        while self._open_connections() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        for connections in self.connection_sets:
            for connection in list(connections):
                connection.abort("gateway shutting down")
        await self._stop_listening()
        self.log.info("stopped")

    def _open_connections(self) -> int:
        return sum(len(connections) for connections in self.connection_sets)

    # What the admin endpoint asks (gateway.admin.Health)

    def problems(self) -> list[str]:
        if self.stopping:
            return ["gateway: shutting down"]
        found = []
        listening = {bound.listener.name for bound in self.bound}
        for listener in self.config.listeners:
            if listener.name not in listening:
                found.append(f"listener {listener.name}: not listening")
        backplane = self.backplane_state()
        if backplane is not None and not backplane[0]:
            found.append("backplane: down")
        return found

    def udp_peer_counts(self) -> dict[str, int]:
        return {name: len(protocol.peers) for name, protocol in self.datagram_listeners.items()}

    def backplane_state(self) -> tuple[bool, int] | None:
        if self.backplane is None:
            return None
        return self.backplane.is_up, self.backplane.unforwarded

    # SIGHUP

    def reload(self) -> None:
        """Re-read the config file and apply what can change without a restart.

        TLS material, allowed origins, UDP allow lists and challenge, limits,
        welcome texts and channel history sizes apply to new connections at
        once; nobody is disconnected. Changes that need a restart are logged
        and not applied; an invalid file is logged and ignored.
        """
        try:
            new = load(self.config.path)
            if self.prepare is not None:
                new = self.prepare(new)
        except ConfigError as e:
            self.log.error("reload: {problem}; keeping the running configuration", problem=str(e))
            return
        restart = _restart_needed(self.config, new)
        for change in restart:
            self.log.warn("reload: {change} needs a restart; not applied", change=change)
        applied = _without_restart_changes(self.config, new)
        self._apply(applied)
        self.config = applied
        self.log.info("reload: applied {path}", path=str(new.path))

    def _apply(self, new: Config) -> None:
        limits = new.limits
        self.flow.reconfigure(limits)
        for listener in new.listeners:
            if isinstance(listener, DatagramListenerConfig):
                self.datagram_listeners[listener.name].reconfigure(listener, limits)
                continue
            assert isinstance(listener, StreamListenerConfig)
            if listener.name in self.line_factories:
                factory = self.line_factories[listener.name]
                factory.listener = listener
                factory.limits = limits
                if listener.tls is not None:
                    factory.handshake_timeout = limits.handshake_timeout
            site = self.sites.get(listener.name)
            if site is not None and site.peer_factory is not None:
                site.peer_factory.configure(listener, limits)
                site.handshake_timeout = limits.handshake_timeout
            server_tls = self.tls.get(listener.name)
            if server_tls is not None and listener.tls is not None:
                self._reload_tls(listener.name, server_tls, listener.tls)
        for name in set(self.config.channels) | set(new.channels):
            self.bus.keep_history(name, new.channel(name).history)

    def _reload_tls(self, name: str, server_tls: ServerTls, settings: TlsSettings) -> None:
        previous = server_tls.settings
        server_tls.settings = settings
        try:
            server_tls.reload()
        except TlsFileError as e:
            server_tls.settings = previous
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


def _configured_where(listener: ListenerConfig) -> str:
    if isinstance(listener, StreamListenerConfig) and listener.endpoint is not None:
        return f"endpoint {listener.endpoint}"
    return host_port(listener.host, listener.port)


_IDENTITY = ("type", "host", "port", "channel", "echo", "endpoint")
_GATEWAY_RESTART = ("name", "workers", "log_level", "log_format")


def _same_identity(old: ListenerConfig, new: ListenerConfig) -> bool:
    return all(getattr(old, key, None) == getattr(new, key, None) for key in _IDENTITY)


def _without_restart_changes(old: Config, new: Config) -> Config:
    """``new``, except where applying it would need a restart: there, ``old`` stays."""
    new_listeners = {listener.name: listener for listener in new.listeners}
    listeners = []
    for listener in old.listeners:
        candidate = new_listeners.get(listener.name)
        keep_new = candidate is not None and _same_identity(listener, candidate)
        listeners.append(candidate if keep_new and candidate is not None else listener)
    gateway = replace(new.gateway, **{key: getattr(old.gateway, key) for key in _GATEWAY_RESTART})
    return replace(
        new, listeners=tuple(listeners), admin=old.admin, cluster=old.cluster, gateway=gateway
    )


def _restart_needed(old: Config, new: Config) -> list[str]:
    """What differs between ``old`` and ``new`` that only a restart can apply."""
    changes = []
    old_listeners = {listener.name: listener for listener in old.listeners}
    new_listeners = {listener.name: listener for listener in new.listeners}
    for name in sorted(set(old_listeners) - set(new_listeners)):
        changes.append(f'removing listener "{name}"')
    for name in sorted(set(new_listeners) - set(old_listeners)):
        changes.append(f'adding listener "{name}"')
    for name in sorted(set(old_listeners) & set(new_listeners)):
        before, after = old_listeners[name], new_listeners[name]
        for key in _IDENTITY:
            if getattr(before, key, None) != getattr(after, key, None):
                changes.append(f'listener "{name}" {key}')
    if old.admin != new.admin:
        changes.append("[admin]")
    if old.cluster != new.cluster:
        changes.append("[cluster]")
    for key in _GATEWAY_RESTART:
        if getattr(old.gateway, key) != getattr(new.gateway, key):
            changes.append(f"gateway.{key}")
    return changes


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
