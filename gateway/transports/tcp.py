"""The ``tcp`` and ``tls`` listeners: one protocol per connection, by the listener's framing."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory

from gateway.config.listeners import TcpListenerConfig
from gateway.config.settings import Limits
from gateway.transports.binary import protocol_for
from gateway.transports.line import LineProtocol
from gateway.transports.listening import ListenerService
from gateway.transports.runtime import GatewayContext, ListenerRuntime
from gateway.transports.stream import StreamProtocol


class StreamFactory(Factory):
    """Builds the protocol of each connection of one ``tcp``/``tls`` listener; a reload's
    ``framing`` applies to the connections made after it."""

    noisy = False

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime

    def buildProtocol(self, addr: Any) -> StreamProtocol:
        return protocol_for(self.runtime) or LineProtocol(self.runtime)


class StreamListener(ListenerService):
    """A ``tcp`` or ``tls`` listener."""

    def protocol_factory(self) -> StreamFactory:
        return StreamFactory(self.runtime)


def build(config: TcpListenerConfig, limits: Limits, context: GatewayContext) -> StreamListener:
    return StreamListener(ListenerRuntime(config, limits, context))
