"""Multi-protocol broadcast gateway: TCP, TLS, UDP and WebSocket peers on one bus.

The stable names are exported here (``__all__``); every other module is an
implementation detail whose names may change. ``gateway.testing`` is the
supported way to test code built on the gateway without sockets.

Names load on first use, so ``import gateway`` stays cheap (``gateway bench``
imports no Twisted at all).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gateway.config.errors import ConfigError
    from gateway.config.load import load, parse
    from gateway.config.settings import Config
    from gateway.core.bus import Bus
    from gateway.core.interfaces import IFramer, IPeer
    from gateway.core.message import Batch, Kind, Origin
    from gateway.server import GatewayService
    from gateway.transports.app import AppPeer, Message
    from gateway.transports.listening import ListenError

_EXPORTS = {
    "AppPeer": "gateway.transports.app",
    "Batch": "gateway.core.message",
    "Bus": "gateway.core.bus",
    "Config": "gateway.config.settings",
    "ConfigError": "gateway.config.errors",
    "GatewayService": "gateway.server",
    "IFramer": "gateway.core.interfaces",
    "IPeer": "gateway.core.interfaces",
    "Kind": "gateway.core.message",
    "ListenError": "gateway.transports.listening",
    "Message": "gateway.transports.app",
    "Origin": "gateway.core.message",
    "load": "gateway.config.load",
    "parse": "gateway.config.load",
}

__all__ = [
    "AppPeer",
    "Batch",
    "Bus",
    "Config",
    "ConfigError",
    "GatewayService",
    "IFramer",
    "IPeer",
    "Kind",
    "ListenError",
    "Message",
    "Origin",
    "__version__",
    "load",
    "parse",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
