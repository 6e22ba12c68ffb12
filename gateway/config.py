"""The TOML configuration, validated into frozen typed objects.

Every problem is reported as one line naming the file and the key, e.g.
``config.toml: listeners[1].port: expected an integer 0-65535, got "80a"``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

STREAM_TYPES = ("tcp", "tls", "ws", "wss")
DATAGRAM_TYPES = ("udp",)
TLS_TYPES = ("tls", "wss")
WEBSOCKET_TYPES = ("ws", "wss")
LISTENER_TYPES = ("tcp", "tls", "ws", "wss", "udp")
TLS_VERSIONS = ("1.2", "1.3")

WELCOME_FIELDS = ("count", "peer", "name")
_CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_NAME_RE = _CHANNEL_RE
MAX_UDP_PAYLOAD = 65507
LISTEN_BACKLOG = 4096
"""Pending connections the kernel may hold per stream port (it caps this at somaxconn)."""


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line shown to the user."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class GatewaySettings:
    name: str = "gateway"
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    shutdown_timeout: float = 5.0


LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class AdminSettings:
    """The operator's HTTP listener: /healthz, /metrics, /peers."""

    host: str
    port: int


@dataclass(frozen=True)
class ChannelSettings:
    history: int = 0


SLOW_CONSUMER_POLICIES = ("disconnect", "drop")
LOOPBACK_ONLY = ("127.0.0.0/8", "::1/128")


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


@dataclass(frozen=True)
class ClusterSettings:
    """The Redis backplane shared by several gateway nodes."""

    redis: str
    node: str
    prefix: str = "gateway"


@dataclass(frozen=True)
class TlsSettings:
    """Certificate material of a ``tls`` or ``wss`` listener (paths already resolved)."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    min_tls: str = "1.2"
    generate_dev_cert: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    """Keys every listener has."""

    name: str
    type: str
    host: str
    port: int
    channel: str
    echo: bool

    @property
    def family(self) -> str:
        """``stream`` or ``datagram``: two listeners of one family cannot share a port."""
        return "datagram" if self.type in DATAGRAM_TYPES else "stream"


@dataclass(frozen=True)
class StreamListenerConfig(ListenerConfig):
    welcome: str
    quit_command: str
    endpoint: str | None = None  # a Twisted server endpoint string instead of host/port
    tls: TlsSettings | None = None
    # WebSocket listeners only.
    ping_interval: float = 30.0
    allowed_origins: tuple[str, ...] | None = None  # None: same origin only


@dataclass(frozen=True)
class DatagramListenerConfig(ListenerConfig):
    peer_timeout: float
    max_peers: int
    allow: tuple[IPv4Network | IPv6Network, ...] = tuple(ip_network(n) for n in LOOPBACK_ONLY)
    challenge: bool = False


@dataclass(frozen=True)
class Config:
    path: Path
    gateway: GatewaySettings
    limits: Limits
    listeners: tuple[ListenerConfig, ...]
    cluster: ClusterSettings | None = None
    admin: AdminSettings | None = None
    channels: Mapping[str, ChannelSettings] = field(default_factory=dict)

    def channel(self, name: str) -> ChannelSettings:
        """Settings of channel ``name`` (defaults when it has no table)."""
        return self.channels.get(name, _DEFAULT_CHANNEL)


_DEFAULT_CHANNEL = ChannelSettings()


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


class _Table:
    """One TOML table being read; remembers which keys were used."""

    def __init__(self, file: str, where: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.where = where
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for name in self.data:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                known = ", ".join(allowed)
                raise self.error(name, f"unknown key{hint}; known keys: {known}")

    def string(
        self,
        name: str,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        what: str = "a string",
    ) -> str:
        if name not in self.data:
            if default is None:
                raise self.error(name, "missing (required)")
            return default
        value = self.data[name]
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise self.error(name, f"expected {what}, got {_show(value)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int | None = None) -> int:
        if name not in self.data:
            if default is None:
                raise self.error(name, "missing (required)")
            return default
        value = self.data[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"{low}-{high}" if high is not None else f">= {low}"
            raise self.error(name, f"expected an integer {bound}, got {_show(value)}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.data.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.error(
                name, f"expected a number of seconds {low:g}-{high:g}, got {_show(value)}"
            )
        return float(value)

    def table(self, name: str) -> _Table:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {_show(value)}")
        return _Table(self.file, self.key(name), value)


def _host(table: _Table) -> str:
    host = table.string("host", "127.0.0.1", what="an IP address")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise table.error(
            "host",
            f'expected an IP address such as "127.0.0.1", "::" or "0.0.0.0", got {_show(host)}',
        ) from None


def _welcome(table: _Table) -> str:
    text = table.string("welcome", "")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as e:
        raise table.error(
            "welcome", f"bad template ({e}); write {{{{ and }}}} for literal braces"
        ) from None
    for placeholder in fields:
        if placeholder not in WELCOME_FIELDS:
            known = ", ".join("{" + f + "}" for f in WELCOME_FIELDS)
            raise table.error("welcome", f"unknown placeholder {{{placeholder}}}; known: {known}")
    return text


_COMMON_KEYS = ("name", "type", "host", "port", "channel", "echo")
_ENDPOINT = ("endpoint",)
_TLS_KEYS = ("cert", "key", "client_ca", "min_tls", "generate_dev_cert")
_WEBSOCKET_KEYS = ("ping_interval", "allowed_origins")
_KEYS = {
    "tcp": (*_COMMON_KEYS, *_ENDPOINT, "welcome", "quit_command"),
    "tls": (*_COMMON_KEYS, *_ENDPOINT, "welcome", "quit_command", *_TLS_KEYS),
    "ws": (*_COMMON_KEYS, *_ENDPOINT, "welcome", *_WEBSOCKET_KEYS),
    "wss": (*_COMMON_KEYS, *_ENDPOINT, "welcome", *_WEBSOCKET_KEYS, *_TLS_KEYS),
    "udp": (*_COMMON_KEYS, "peer_timeout", "max_peers", "allow", "challenge"),
}


def _path(table: _Table, name: str, base: Path, required: bool) -> Path | None:
    if name not in table.data and not required:
        return None
    value = table.string(name, what="a file path")
    if not value:
        raise table.error(name, "expected a file path, got an empty string")
    return base / Path(value).expanduser()


def _tls(table: _Table, base: Path) -> TlsSettings:
    cert = _path(table, "cert", base, required=True)
    key = _path(table, "key", base, required=True)
    assert cert is not None and key is not None
    min_tls = table.string("min_tls", "1.2")
    if min_tls not in TLS_VERSIONS:
        raise table.error("min_tls", f'expected "1.2" or "1.3", got {_show(min_tls)}')
    return TlsSettings(
        cert=cert,
        key=key,
        client_ca=_path(table, "client_ca", base, required=False),
        min_tls=min_tls,
        generate_dev_cert=table.boolean("generate_dev_cert", False),
    )


def _origins(table: _Table) -> tuple[str, ...] | None:
    if "allowed_origins" not in table.data:
        return None
    value = table.data["allowed_origins"]
    if not isinstance(value, list) or not all(isinstance(o, str) and o for o in value):
        raise table.error(
            "allowed_origins",
            f'expected a list of origins such as ["https://example.com"] or ["*"], got {_show(value)}',
        )
    for origin in value:
        if origin != "*" and not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]+$", origin):
            raise table.error(
                "allowed_origins",
                f'expected origins like "https://example.com:8443" (scheme://host[:port], '
                f"no path), got {_show(origin)}",
            )
    return tuple(origin.lower() for origin in value)


def _listener(table: _Table, base: Path) -> ListenerConfig:
    kind = table.string("type")
    if kind not in LISTENER_TYPES:
        raise table.error("type", f"expected one of {', '.join(LISTENER_TYPES)}, got {_show(kind)}")
    table.check_keys(_KEYS[kind])
    endpoint = _endpoint(table)
    common: dict[str, Any] = {
        "name": table.string("name", pattern=_NAME_RE, what="a name of letters, digits, . _ : -"),
        "type": kind,
        "host": _host(table) if endpoint is None else "",
        "port": table.integer("port", None, 0, 65535) if endpoint is None else 0,
        "channel": table.string(
            "channel",
            "main",
            pattern=_CHANNEL_RE,
            what="a channel name of letters, digits, . _ : -",
        ),
        "echo": table.boolean("echo", False),
    }
    if kind in STREAM_TYPES:
        return StreamListenerConfig(
            **common,
            welcome=_welcome(table),
            quit_command=table.string("quit_command", ""),
            endpoint=endpoint,
            tls=_tls(table, base) if kind in TLS_TYPES else None,
            ping_interval=table.number("ping_interval", 30.0, 0.0, 3600.0),
            allowed_origins=_origins(table),
        )
    return DatagramListenerConfig(
        **common,
        peer_timeout=table.number("peer_timeout", 60.0, 0.1, 86400.0),
        max_peers=table.integer("max_peers", 1024, 1, 1_000_000),
        allow=_networks(table, "allow", LOOPBACK_ONLY),
        challenge=table.boolean("challenge", False),
    )


def _endpoint(table: _Table) -> str | None:
    if "endpoint" not in table.data:
        return None
    for clash in ("host", "port"):
        if clash in table.data:
            raise table.error(clash, "give either endpoint or host/port, not both")
    text = table.string("endpoint", what="a Twisted server endpoint string")
    kind = text.split(":", 1)[0]
    if kind not in _endpoint_types():
        raise table.error(
            "endpoint",
            f'expected a server endpoint string such as "tcp:8006:interface=127.0.0.1", '
            f'"unix:/run/gateway.sock", "systemd:domain=INET:index=0" or "haproxy:tcp:8006", '
            f"got {_show(text)} (unknown type {_show(kind)})",
        )
    return text


def _endpoint_types() -> set[str]:
    """Server endpoint types Twisted knows: its built-in ones and installed plugins."""
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    builtin = {"tcp", "tcp6", "unix", "ssl", "systemd", "haproxy"}
    return builtin | {p.prefix for p in getPlugins(IStreamServerEndpointStringParser)}


def _networks(
    table: _Table, name: str, default: tuple[str, ...]
) -> tuple[IPv4Network | IPv6Network, ...]:
    value = table.data.get(name, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise table.error(
            name, f'expected a list of networks such as ["127.0.0.0/8"], got {_show(value)}'
        )
    networks = []
    for text in value:
        try:
            networks.append(ip_network(text, strict=False))
        except ValueError:
            raise table.error(
                name,
                f'expected networks in CIDR form such as "10.0.0.0/8" or "::1/128", got {_show(text)}',
            ) from None
    return tuple(networks)


def _admin(root: _Table) -> AdminSettings | None:
    if "admin" not in root.data:
        return None
    table = root.table("admin")
    table.check_keys(("host", "port"))
    return AdminSettings(host=_host(table), port=table.integer("port", None, 0, 65535))


def _channels(root: _Table) -> dict[str, ChannelSettings]:
    table = root.table("channels")
    channels = {}
    for name in table.data:
        if not _CHANNEL_RE.match(name):
            raise table.error(name, "expected a channel name of letters, digits, . _ : -")
        channel = table.table(name)
        channel.check_keys(("history",))
        channels[name] = ChannelSettings(history=channel.integer("history", 0, 0, 100_000))
    return channels


def _cluster(root: _Table) -> ClusterSettings | None:
    if "cluster" not in root.data:
        return None
    table = root.table("cluster")
    table.check_keys(("redis", "node", "prefix"))
    redis = table.string("redis", what="a redis:// or rediss:// URL")
    if not re.match(r"^rediss?://[^\s]+$", redis):
        raise table.error("redis", f"expected a redis:// or rediss:// URL, got {_show(redis)}")
    return ClusterSettings(
        redis=redis,
        node=table.string(
            "node",
            f"{socket.gethostname()}-{os.getpid()}",
            pattern=_NAME_RE,
            what="a node name of letters, digits, . _ : -",
        ),
        prefix=table.string(
            "prefix", "gateway", pattern=_NAME_RE, what="a prefix of letters, digits, . _ : -"
        ),
    )


def _check_tls_files(table: _Table, settings: TlsSettings) -> None:
    from gateway.tls import TlsFileError, check_tls_files  # tls needs this module's types

    try:
        check_tls_files(settings)
    except TlsFileError as e:
        raise table.error(e.key, e.problem) from None


def parse(data: Mapping[str, Any], file: str, path: Path | None = None) -> Config:
    """Validate parsed TOML ``data``; ``file`` names it in errors."""
    root = _Table(file, "", data)
    root.check_keys(("gateway", "limits", "listeners", "cluster", "admin", "channels"))

    gateway_table = root.table("gateway")
    gateway_table.check_keys(("name", "workers", "log_level", "log_format", "shutdown_timeout"))
    log_level = gateway_table.string("log_level", "info")
    if log_level not in LOG_LEVELS:
        raise gateway_table.error(
            "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {_show(log_level)}"
        )
    log_format = gateway_table.string("log_format", "text")
    if log_format not in LOG_FORMATS:
        raise gateway_table.error(
            "log_format", f'expected "text" or "json", got {_show(log_format)}'
        )
    gateway = GatewaySettings(
        name=gateway_table.string("name", "gateway"),
        workers=gateway_table.integer("workers", 1, 1, 64),
        log_level=log_level,
        log_format=log_format,
        shutdown_timeout=gateway_table.number("shutdown_timeout", 5.0, 0.0, 3600.0),
    )
    cluster = _cluster(root)
    if gateway.workers > 1 and cluster is None:
        raise gateway_table.error(
            "workers", "more than 1 worker needs a [cluster] table (the workers share it)"
        )

    limits_table = root.table("limits")
    limits_table.check_keys(
        (
            "max_message_bytes",
            "max_pending_bytes",
            "handshake_timeout",
            "slow_consumer",
            "max_messages_per_second",
            "max_total_pending_bytes",
            "idle_timeout",
            "max_connections",
            "max_connections_per_ip",
        )
    )
    slow_consumer = limits_table.string("slow_consumer", "disconnect")
    if slow_consumer not in SLOW_CONSUMER_POLICIES:
        raise limits_table.error(
            "slow_consumer", f'expected "disconnect" or "drop", got {_show(slow_consumer)}'
        )
    limits = Limits(
        max_message_bytes=limits_table.integer("max_message_bytes", 65536, 1, 16 * 1024 * 1024),
        max_pending_bytes=limits_table.integer("max_pending_bytes", 1024 * 1024, 1024),
        handshake_timeout=limits_table.number("handshake_timeout", 10.0, 0.1, 3600.0),
        slow_consumer=slow_consumer,
        max_messages_per_second=limits_table.number("max_messages_per_second", 0.0, 0.0, 1e9),
        max_total_pending_bytes=limits_table.integer(
            "max_total_pending_bytes", 256 * 1024 * 1024, 65536
        ),
        idle_timeout=limits_table.number("idle_timeout", 0.0, 0.0, 86400.0),
        max_connections=limits_table.integer("max_connections", 10000, 1, 1_000_000),
        max_connections_per_ip=limits_table.integer("max_connections_per_ip", 0, 0, 1_000_000),
    )

    raw_listeners = data.get("listeners")
    if raw_listeners is None or raw_listeners == []:
        raise ConfigError(file, "listeners", "missing: add at least one [[listeners]] table")
    if not isinstance(raw_listeners, list) or not all(isinstance(t, dict) for t in raw_listeners):
        raise ConfigError(file, "listeners", "expected [[listeners]] tables")
    listeners: list[ListenerConfig] = []
    names: set[str] = set()
    bound: set[tuple[str, str, int]] = set()
    base = (path if path is not None else Path(file)).parent
    for index, raw in enumerate(raw_listeners):
        table = _Table(file, f"listeners[{index}]", raw)
        listener = _listener(table, base)
        if listener.name in names:
            raise table.error("name", f"duplicate listener name {_show(listener.name)}")
        names.add(listener.name)
        address = (listener.family, listener.host, listener.port)
        if listener.port != 0 and listener.host and address in bound:
            raise table.error(
                "port",
                f"another {listener.family} listener already uses {listener.host} port {listener.port}",
            )
        bound.add(address)
        listeners.append(listener)
    # Certificates another listener generates on start need not exist yet.
    generated = {
        (lc.tls.cert, lc.tls.key)
        for lc in listeners
        if isinstance(lc, StreamListenerConfig) and lc.tls is not None and lc.tls.generate_dev_cert
    }
    for index, lc in enumerate(listeners):
        if isinstance(lc, StreamListenerConfig) and lc.tls is not None:
            if (lc.tls.cert, lc.tls.key) in generated and not lc.tls.cert.exists():
                continue
            _check_tls_files(_Table(file, f"listeners[{index}]", raw_listeners[index]), lc.tls)
    return Config(
        path=path if path is not None else Path(file),
        gateway=gateway,
        limits=limits,
        listeners=tuple(listeners),
        cluster=cluster,
        admin=_admin(root),
        channels=_channels(root),
    )


def load(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    file = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(file, "", f"cannot read the file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "the file is not valid UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"invalid TOML: {e}") from None
    return parse(data, file, path)
