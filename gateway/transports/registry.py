"""Which service runs each listener type: one builder signature for every type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.config.listeners import ListenerConfig
from gateway.config.settings import Limits
from gateway.transports import tcp
from gateway.transports.datagram import secure as dtls
from gateway.transports.datagram import server as datagram
from gateway.transports.listening import ListenerService
from gateway.transports.runtime import GatewayContext
from gateway.transports.websocket import site as websocket

Builder = Callable[[Any, Limits, GatewayContext], ListenerService]
"""``build(listener_config, limits, context)``: the service of one listener."""

BUILDERS: Mapping[str, Builder] = {
    "tcp": tcp.build,
    "tls": tcp.build,
    "udp": datagram.build,
    "dtls": dtls.build,
    "ws": websocket.build,
    "wss": websocket.build,
}


def build_listener(
    config: ListenerConfig, limits: Limits, context: GatewayContext
) -> ListenerService:
    """The service of the listener ``config`` describes."""
    return BUILDERS[config.type](config, limits, context)
