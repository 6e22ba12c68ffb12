"""The validated configuration: frozen settings of the gateway as a whole.

Listener settings live in ``gateway.config.listeners``; ``gateway.config.load``
builds all of these from TOML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.auth.identities import Token, User
from gateway.auth.roles import Role
from gateway.auth.tokens import JwtSettings
from gateway.config.listeners import ListenerConfig
from gateway.core.channels import has_wildcard, matches, specificity

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
SLOW_CONSUMER_POLICIES = ("disconnect", "drop")


@dataclass(frozen=True)
class GatewaySettings:
    name: str = "gateway"
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    shutdown_timeout: float = 5.0


@dataclass(frozen=True)
class AdminSettings:
    """The operator's HTTP listener: /healthz, /metrics, /peers, /stats, /channels, actions."""

    host: str
    port: int
    # SHA-256 (hex) of the admin token; with it, every request needs ``Bearer <token>``.
    token_sha256: str | None = None
    # With a token: /healthz and /metrics still answer without one.
    open_metrics: bool = False


@dataclass(frozen=True)
class ChannelSettings:
    history: int = 0  # messages kept (and numbered: offsets, epoch); 0: none
    history_ttl: float = 0.0  # seconds a kept message is kept at most; 0: no limit


@dataclass(frozen=True)
class HistorySettings:
    """``[history]``: where the history of channels that keep some lives."""

    store: str = "memory"  # "memory", "sqlite" or "redis" (the [cluster] Redis)
    path: Path | None = None  # the sqlite file (``store = "sqlite:PATH"``)

    def describe(self) -> str:
        """``memory``, or ``sqlite PATH``: for logs and /healthz."""
        return self.store if self.path is None else f"{self.store} {self.path}"


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 65536
    max_pending_bytes: int = 1024 * 1024
    handshake_timeout: float = 10.0
    slow_consumer: str = "disconnect"
    max_messages_per_second: float = 0.0  # 0 = no limit
    max_total_pending_bytes: int = 256 * 1024 * 1024
    idle_timeout: float = 0.0  # 0 = off
    max_connections: int = 10000
    max_connections_per_ip: int = 0  # 0 = off
    max_subscriptions: int = 100  # per peer, its own channel included
    max_channels: int = 100_000  # names and patterns subscribed, or keeping history, at once
    auth_timeout: float = 5.0  # seconds from connect (after TLS) to signing in
    max_auth_failures: int = 10  # per source IP per minute; past it refused for 60 s; 0: off


@dataclass(frozen=True)
class ClusterSettings:
    """The Redis backplane shared by several gateway nodes."""

    redis: str
    node: str
    prefix: str = "gateway"


_DEFAULT_CHANNEL = ChannelSettings()


@dataclass(frozen=True)
class AuthSettings:
    """``[auth]``: who may sign in."""

    users: Mapping[str, User] = field(default_factory=dict)
    tokens: Mapping[str, Token] = field(default_factory=dict)
    jwt: JwtSettings | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    gateway: GatewaySettings
    limits: Limits
    listeners: tuple[ListenerConfig, ...]
    cluster: ClusterSettings | None = None
    admin: AdminSettings | None = None
    channels: Mapping[str, ChannelSettings] = field(default_factory=dict)
    roles: Mapping[str, Role] = field(default_factory=dict)
    auth: AuthSettings = field(default_factory=AuthSettings)
    history: HistorySettings = field(default_factory=HistorySettings)

    def channel(self, name: str) -> ChannelSettings:
        """Settings of channel ``name``: its own table, else the most specific pattern's
        that matches it (``[channels."room.*"]``), else the defaults."""
        exact = self.channels.get(name)
        if exact is not None:
            return exact
        found = [
            pattern for pattern in self.channels if has_wildcard(pattern) and matches(pattern, name)
        ]
        if not found:
            return _DEFAULT_CHANNEL
        return self.channels[max(found, key=specificity)]
