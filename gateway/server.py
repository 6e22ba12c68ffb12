"""From a ``Config`` to a running gateway: the bus, and one child service per listener.

``GatewayService`` is a ``MultiService``: each ``[[listeners]]`` table becomes
a ``ListenerService`` child (built by ``gateway.transports.registry``), the
cluster backplane another child. Started by ``twistd``/``twist`` (or
``startService`` in an application), it listens in ``privilegedStartService``;
``gateway --config`` awaits ``listen()`` first so that a port in use exits 1 (and a
history file that cannot be opened: ``listen`` reads it back before binding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from gateway.auth.identities import Authenticator
from gateway.auth.lockout import Lockout
from gateway.auth.roles import Access
from gateway.auth.verifier import Verifier, VerifierService
from gateway.config.errors import ConfigError
from gateway.config.listeners import WsListenerConfig
from gateway.config.load import load
from gateway.config.reload import restart_needed, without_restart_changes
from gateway.config.settings import Config
from gateway.core.bus import Bus
from gateway.core.metrics import Metrics
from gateway.flow.connection import Governor
from gateway.ops.admin import AdminSite
from gateway.stores.durable import DurableHistory, Runner
from gateway.stores.sqlite import HistoryFileError
from gateway.tls.devcerts import ensure_dev_server_cert
from gateway.tls.pki import PkiError
from gateway.transports.address import host_port
from gateway.transports.app import AppPeer, Message
from gateway.transports.listening import ListenError, ListenerService, cannot_listen
from gateway.transports.registry import build_listener
from gateway.transports.runtime import GatewayContext, ListenerRuntime

if TYPE_CHECKING:
    from gateway.cluster.backplane import Backplane

__all__ = ["GatewayService", "ListenError"]


class GatewayService(MultiService):
    """The whole gateway. ``listen()`` binds every listener; stopping drains the peers."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        reuse_port: bool = False,
        prepare: Callable[[Config], Config] | None = None,
        verifier: Verifier | None = None,
        history_runner: Runner | None = None,
    ) -> None:
        """``verifier`` checks password hashes: by default a pool of threads this service
        owns (``VerifierService``); tests on a memory reactor pass an inline one. So does
        ``history_runner`` for the sqlite history store's work (by default its own thread)."""
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor
        # What a reloaded file goes through before use (a worker's own ports and node id).
        self.prepare = prepare
        self.metrics = Metrics()
        limits = config.limits
        self.bus = Bus(
            self.metrics,
            reactor,
            max_subscriptions=limits.max_subscriptions,
            max_channels=limits.max_channels,
        )
        self.governor = Governor(config.limits, self.metrics, reactor)
        if verifier is None:
            hashing = VerifierService(reactor)
            hashing.setServiceParent(self)  # type: ignore[no-untyped-call]
            verifier = hashing.verifier
        access = Access(config.roles, cache_size=limits.max_channels)
        self.context = GatewayContext(
            self.bus,
            self.governor,
            reactor,
            config.gateway.name,
            access=access,
            authenticator=Authenticator(
                config.auth.users, config.auth.tokens, access, verifier, config.auth.jwt
            ),
            lockout=Lockout(reactor, limits.max_auth_failures),
        )
        self.admin_port: IListeningPort | None = None
        self.listening = False
        self._listen_started = False
        self.stopping = False
        # WebSocket endpoints mounted in a site of the application (``websocket_resource``).
        self.mounted: list[ListenerRuntime] = []
        # One child service per listener, by name, in the config's order.
        self.listeners: dict[str, ListenerService] = {}
        for listener in config.listeners:
            service = build_listener(listener, config.limits, self.context)
            # A worker process: listen on ports the other workers share (SO_REUSEPORT).
            service.reuse_port = reuse_port
            service.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.listeners[listener.name] = service
        self.bus.history.resize(self._history_size, self._history_ttl)
        # [history] store = "sqlite:PATH": the logs persisted (read back by ``listen``).
        self.store: DurableHistory | None = None
        if config.history.path is not None:
            self.store = DurableHistory(
                config.history.path, self.bus.history, reactor, history_runner
            )
        self.backplane: Backplane | None = None
        if config.cluster is not None:
            from gateway.cluster.backplane import Backplane  # the Redis client only when clustering

            self.backplane = Backplane(config.cluster, self.bus, reactor)
            self.bus.backplane = self.backplane
            self.backplane.setServiceParent(self)  # type: ignore[no-untyped-call]
            if config.history.store == "redis":
                from gateway.cluster.archive import keep_history

                keep_history(self.backplane)

    def _history_size(self, channel: str) -> int:
        return self.config.channel(channel).history

    def _history_ttl(self, channel: str) -> float:
        return self.config.channel(channel).history_ttl

    # Listening

    async def listen(self) -> list[ListenerService]:
        """Bind every listener, or none: on the first failure the others are closed."""
        if self.listening:
            return list(self.listeners.values())
        try:
            await self._open_store()
            self._generate_dev_certs()
            for service in self.listeners.values():
                await service.listen(self.reactor)
            self._listen_admin()
        except ListenError:
            await self._stop_listening()
            if self.store is not None:
                await self.store.close()
            raise
        self.listening = True
        for service in self.listeners.values():
            self.log.info("listening {what}", what=service.describe())
        if self.admin_port is not None:
            address: Any = self.admin_port.getHost()
            self.log.info(
                'listening admin {where} (listener "admin": /healthz /metrics /peers /stats /channels)',
                where=host_port(address.host, address.port),
            )
        return list(self.listeners.values())

    async def _open_store(self) -> None:
        """Read the history file back before anyone is served: each channel continues
        where it was (a file that cannot be used stops the start, as a port in use does)."""
        if self.store is None:
            return
        try:
            await self.store.open()
        except HistoryFileError as e:
            raise ListenError(f"[history] store: {e}") from e

    def privilegedStartService(self) -> None:
        """``IService``: listen (bound ports are what needs privileges), unless already done."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._start_listening()

    def startService(self) -> None:
        """``IService``: as Twisted's endpoint services do, listen now if nobody did yet."""
        self._start_listening()
        super().startService()  # type: ignore[no-untyped-call]

    def _start_listening(self) -> None:
        if self.listening or self._listen_started:
            return
        self._listen_started = True
        listening = Deferred.fromCoroutine(self.listen())
        listening.addErrback(self._listen_failed)

    def _listen_failed(self, failure: Failure) -> None:
        self.log.critical("gateway: {problem}", problem=str(failure.value))
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def _listen_admin(self) -> None:
        admin = self.config.admin
        if admin is None:
            return
        try:
            self.admin_port = self.reactor.listenTCP(
                admin.port, AdminSite(self, self.reactor, admin), interface=admin.host
            )
        except Exception as e:
            where = f"admin {host_port(admin.host, admin.port)}"
            raise ListenError(cannot_listen(where, e)) from e

    def _generate_dev_certs(self) -> None:
        """Make missing dev certificates first: listeners may share them."""
        for listener in self.config.listeners:
            settings = listener.tls_settings
            if settings is None or not settings.generate_dev_cert:
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

    async def _stop_listening(self, admin: bool = True) -> None:
        for service in self.listeners.values():
            await service.stop_listening()
        if admin and self.admin_port is not None:
            port, self.admin_port = self.admin_port, None
            result = port.stopListening()
            if isinstance(result, Deferred):
                await result

    # Stopping

    def stopService(self) -> Deferred[None]:
        # Listeners stop accepting and the backplane disconnects; then the drain.
        stopped = super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._shutdown(stopped))

    async def _shutdown(self, children_stopped: Deferred[None]) -> None:
        """Drain: stop accepting, close every peer after its queued output, then stop.

        WebSocket peers get close code 1001; stream peers' queued output is
        flushed for up to ``shutdown_timeout`` seconds before what is left is cut.
        """
        self.stopping = True
        self.log.info("shutting down: closing {count} peers", count=self.bus.peer_count)
        # The admin port stays up while draining: /healthz answers 503 meanwhile.
        await self._stop_listening(admin=False)
        await children_stopped
        timeout = self.config.gateway.shutdown_timeout
        for runtime in self._runtimes():
            runtime.draining = timeout
        self.bus.close_all("gateway shutting down")
        deadline = self.reactor.seconds() + timeout
        while self._open_connections() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05, lambda: None)
        for runtime in self._runtimes():
            runtime.abort_all("gateway shutting down")
        await self._stop_listening()
        if self.store is not None:
            await self.store.close()  # after the peers: what they were sent is numbered
        self.listening = False
        self.log.info("stopped")

    def _runtimes(self) -> list[ListenerRuntime]:
        """Every listener's runtime, and those of WebSocket endpoints mounted elsewhere."""
        return [service.runtime for service in self.listeners.values()] + self.mounted

    def _open_connections(self) -> int:
        return sum(len(runtime.connections) for runtime in self._runtimes())

    # Embedding

    def app_peer(
        self,
        on_message: Callable[[Message], object] | None = None,
        channel: str = "main",
        name: str = "app",
        echo: bool = False,
    ) -> AppPeer:
        """A peer in application code on ``channel``: ``publish`` from it, hear the
        channel's messages in ``on_message``."""
        return AppPeer(self.bus, on_message, channel, name, echo)

    def websocket_resource(self, config: WsListenerConfig) -> IResource:
        """The WebSocket endpoint of ``config`` (a ``ws`` listener's settings; its
        host and port are not used) as a resource to mount in a ``twisted.web`` site.

        Its connections count against the gateway's caps and limits, follow
        reloads of ``[limits]`` and are drained when the gateway stops.
        """
        from autobahn.twisted.resource import WebSocketResource

        from gateway.transports.websocket.peer import WebSocketPeerFactory

        runtime = ListenerRuntime(config, self.config.limits, self.context)
        self.mounted.append(runtime)
        resource: IResource = WebSocketResource(WebSocketPeerFactory(runtime))
        return resource

    # What the admin endpoint asks (gateway.ops.admin.Health)

    def problems(self) -> list[str]:
        if self.stopping:
            return ["gateway: shutting down"]
        found = [
            f"listener {name}: not listening"
            for name, service in self.listeners.items()
            if service.port is None
        ]
        backplane = self.backplane_state()
        if backplane is not None and not backplane[0]:
            found.append("backplane: down")
        kind, problem, _ = self.history_state()
        if problem is not None:
            found.append(f"history: {kind} failing: {problem}")
        return found

    def history_state(self) -> tuple[str, str | None, int]:
        store = self.store
        if self.config.history.store == "redis":
            up = self.backplane is not None and self.backplane.is_up
            return "redis", None if up else "Redis unreachable", 0
        if store is None:
            return "memory", None, 0
        return store.kind, store.problem, store.unwritten

    def udp_peer_counts(self) -> dict[str, int]:
        return {
            name: count
            for name, service in self.listeners.items()
            if (count := service.peer_count()) is not None
        }

    def backplane_state(self) -> tuple[bool, int] | None:
        if self.backplane is None:
            return None
        return self.backplane.is_up, self.backplane.unforwarded

    # SIGHUP

    def reload(self) -> None:
        """Re-read the config file and apply what can change without a restart.

        TLS material, allowed origins, UDP allow lists and challenge, limits,
        welcome texts and channel history sizes apply to new connections at
        once, on every listener type; nobody is disconnected. Changes that need
        a restart are logged and not applied; an invalid file is logged and ignored.
        """
        try:
            new = load(self.config.path)
            if self.prepare is not None:
                new = self.prepare(new)
        except ConfigError as e:
            self.log.error("reload: {problem}; keeping the running configuration", problem=str(e))
            return
        for change in restart_needed(self.config, new):
            self.log.warn("reload: {change} needs a restart; not applied", change=change)
        self.apply(without_restart_changes(self.config, new))
        self.log.info("reload: applied {path}", path=str(new.path))

    def apply(self, new: Config) -> None:
        """Run with ``new`` (which must need no restart), as a reload does."""
        limits = new.limits
        self.governor.reconfigure(limits)
        self.bus.max_subscriptions = limits.max_subscriptions
        self.bus.max_channels = limits.max_channels
        self.bus.history.max_channels = limits.max_channels
        self.context.access.update(new.roles)
        self.context.authenticator.update(new.auth.users, new.auth.tokens, new.auth.jwt)
        self.context.lockout.limit = limits.max_auth_failures
        for listener in new.listeners:
            self.listeners[listener.name].reconfigure(listener, limits)
        for runtime in self.mounted:
            runtime.reconfigure(runtime.config, limits)
        self.config = new
        self.bus.history.resize()
        # Users, tokens and roles apply at once to everyone: who was removed goes, and
        # what the roles no longer allow ends now.
        for runtime in self._runtimes():
            runtime.reauthorize()
        for peer, subscription in self.bus.recheck():
            self.log.info(
                "reload: {peer} is no longer allowed to subscribe to {subscription}; ended",
                peer=peer.origin.peer_id,
                subscription=subscription,
            )
            peer.forbidden("subscribe", subscription)
