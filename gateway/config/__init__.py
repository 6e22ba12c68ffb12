"""The configuration: TOML in, frozen typed settings out (``load``), and the reload diff."""

from __future__ import annotations

from gateway.config.errors import ConfigError
from gateway.config.listeners import (
    LISTENER_CLASSES,
    DtlsListenerConfig,
    ListenerConfig,
    StreamListenerConfig,
    TcpListenerConfig,
    TlsListenerConfig,
    UdpListenerConfig,
    WsListenerConfig,
    WssListenerConfig,
)
from gateway.config.load import load, parse
from gateway.config.settings import (
    AdminSettings,
    ChannelSettings,
    ClusterSettings,
    Config,
    GatewaySettings,
    HistorySettings,
    Limits,
)
from gateway.tls.files import TlsSettings

__all__ = [
    "LISTENER_CLASSES",
    "AdminSettings",
    "ChannelSettings",
    "ClusterSettings",
    "Config",
    "ConfigError",
    "DtlsListenerConfig",
    "GatewaySettings",
    "HistorySettings",
    "Limits",
    "ListenerConfig",
    "StreamListenerConfig",
    "TcpListenerConfig",
    "TlsListenerConfig",
    "TlsSettings",
    "UdpListenerConfig",
    "WsListenerConfig",
    "WssListenerConfig",
    "load",
    "parse",
]
