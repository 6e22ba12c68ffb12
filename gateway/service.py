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

from gateway.address import host_port
from gateway.bus import Bus
from gateway.config import (
    Config,
    DatagramListenerConfig,
    ListenerConfig,
    StreamListenerConfig,
)
from gateway.metrics import Metrics
from gateway.tcp import LineFactory
from gateway.udp import DatagramListener


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
        self.bound: list[Bound] = []
        self.factories: list[LineFactory] = []

    async def listen(self) -> list[Bound]:
        """Bind every listener, or none: on the first failure the others are closed."""
        try:
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
            factory = LineFactory(
                self.bus, listener, limits, self.config.gateway.name, self.reactor
            )
            self.factories.append(factory)
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
        for factory in self.factories:
            for connection in list(factory.connections):
                connection.abort("gateway shutting down")
        self.log.info("stopped")

    def _open_connections(self) -> int:
        return sum(len(factory.connections) for factory in self.factories)


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
