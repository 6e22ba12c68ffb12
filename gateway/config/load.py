"""Loading the TOML configuration into frozen typed objects.

Every problem is reported as one line naming the file and the key, e.g.
``config.toml: listeners[1].port: expected an integer 0-65535, got "80a"``.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from gateway.auth.credentials import token_digest_error
from gateway.config.access import check_access, parse_auth, parse_roles
from gateway.config.errors import ConfigError
from gateway.config.listeners import NAME_RE, ListenerConfig, parse_listener
from gateway.config.settings import (
    LOG_FORMATS,
    LOG_LEVELS,
    SLOW_CONSUMER_POLICIES,
    AdminSettings,
    ChannelSettings,
    ClusterSettings,
    Config,
    GatewaySettings,
    HistorySettings,
    Limits,
)
from gateway.config.tables import Table, show
from gateway.core.channels import PATTERN_RULE, is_pattern
from gateway.tls.files import TlsFileError, TlsSettings, check_tls_files


def _admin(root: Table) -> AdminSettings | None:
    if "admin" not in root.data:
        return None
    table = root.table("admin")
    table.check_keys(("host", "port", "token_sha256", "open_metrics"))
    host = table.host()
    token = table.string("token_sha256", "") or None
    if token is not None and (problem := token_digest_error(token)) is not None:
        raise table.error("token_sha256", problem)
    if token is None and not ip_address(host).is_loopback:
        raise table.error(
            "token_sha256",
            f"missing: the admin listener is reachable from other hosts ({host}), so it needs "
            'a token (make one with "gateway token new admin" and give its sha256 here), or '
            'bind it to loopback (host = "127.0.0.1")',
        )
    return AdminSettings(
        host=host,
        port=table.integer("port", None, 0, 65535),
        token_sha256=token.lower() if token else None,
        open_metrics=table.boolean("open_metrics", False),
    )


def _channels(root: Table) -> dict[str, ChannelSettings]:
    table = root.table("channels")
    channels = {}
    for name in table.data:
        if not is_pattern(name):
            raise table.error(name, f"expected {PATTERN_RULE}")
        channel = table.table(name)
        channel.check_keys(("history", "history_ttl"))
        history = channel.integer("history", 0, 0, 100_000)
        channels[name] = ChannelSettings(history=history, history_ttl=_history_ttl(channel))
        if channels[name].history_ttl and not history:
            raise channel.error("history_ttl", "needs history above 0")
    return channels


def _history(root: Table, base: Path, gateway: GatewaySettings, clustered: bool) -> HistorySettings:
    """``[history] store``: "memory" (the default), "sqlite:PATH" (relative to the
    config file's folder) or "redis" (the ``[cluster]`` Redis, Redis Streams)."""
    table = root.table("history")
    table.check_keys(("store",))
    expected = 'expected "memory", "sqlite:PATH" or "redis"'
    value = table.data.get("store", "memory")
    if not isinstance(value, str):
        raise table.error("store", f"{expected}, got {show(value)}")
    if value == "memory":
        return HistorySettings()
    if value == "redis":
        if not clustered:
            raise table.error(
                "store", '"redis" keeps history in the [cluster] Redis: add a [cluster] table'
            )
        return HistorySettings(store="redis")
    kind, colon, path = value.partition(":")
    if kind != "sqlite" or not colon:
        raise table.error("store", f"{expected}, got {show(value)}")
    if not path.strip():
        raise table.error("store", 'expected a file path after "sqlite:", got an empty one')
    if gateway.workers > 1:
        raise table.error(
            "store",
            "an sqlite file belongs to one process: it cannot serve "
            f"{gateway.workers} workers (gateway.workers)",
        )
    return HistorySettings(store="sqlite", path=base / Path(path).expanduser())


def _history_ttl(channel: Table) -> float:
    """``history_ttl``: seconds above 0 (absent: no limit, 0.0)."""
    if "history_ttl" not in channel.data:
        return 0.0
    value = channel.data["history_ttl"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise channel.error(
            "history_ttl", f"expected a number of seconds above 0, got {show(value)}"
        )
    return float(value)


def _cluster(root: Table) -> ClusterSettings | None:
    if "cluster" not in root.data:
        return None
    table = root.table("cluster")
    table.check_keys(("redis", "node", "prefix"))
    redis = table.string("redis", what="a redis:// or rediss:// URL")
    if not re.match(r"^rediss?://[^\s]+$", redis):
        raise table.error("redis", f"expected a redis:// or rediss:// URL, got {show(redis)}")
    return ClusterSettings(
        redis=redis,
        node=table.string(
            "node",
            f"{socket.gethostname()}-{os.getpid()}",
            pattern=NAME_RE,
            what="a node name of letters, digits, . _ : -",
        ),
        prefix=table.string(
            "prefix", "gateway", pattern=NAME_RE, what="a prefix of letters, digits, . _ : -"
        ),
    )


def _check_tls_files(table: Table, settings: TlsSettings) -> None:
    try:
        check_tls_files(settings)
    except TlsFileError as e:
        raise table.error(e.key, e.problem) from None


def parse(data: Mapping[str, Any], file: str, path: Path | None = None) -> Config:
    """Validate parsed TOML ``data``; ``file`` names it in errors."""
    root = Table(file, "", data)
    root.check_keys(
        (
            "gateway",
            "limits",
            "listeners",
            "cluster",
            "admin",
            "channels",
            "history",
            "roles",
            "auth",
        )
    )
    roles = parse_roles(root)
    base = (path if path is not None else Path(file)).parent
    auth = parse_auth(root, roles, base)

    gateway_table = root.table("gateway")
    gateway_table.check_keys(("name", "workers", "log_level", "log_format", "shutdown_timeout"))
    log_level = gateway_table.string("log_level", "info")
    if log_level not in LOG_LEVELS:
        raise gateway_table.error(
            "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {show(log_level)}"
        )
    log_format = gateway_table.string("log_format", "text")
    if log_format not in LOG_FORMATS:
        raise gateway_table.error(
            "log_format", f'expected "text" or "json", got {show(log_format)}'
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
    history = _history(root, base, gateway, cluster is not None)

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
            "max_subscriptions",
            "max_channels",
            "auth_timeout",
            "max_auth_failures",
        )
    )
    slow_consumer = limits_table.string("slow_consumer", "disconnect")
    if slow_consumer not in SLOW_CONSUMER_POLICIES:
        raise limits_table.error(
            "slow_consumer", f'expected "disconnect" or "drop", got {show(slow_consumer)}'
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
        max_subscriptions=limits_table.integer("max_subscriptions", 100, 1, 100_000),
        max_channels=limits_table.integer("max_channels", 100_000, 1, 10_000_000),
        auth_timeout=limits_table.number("auth_timeout", 5.0, 0.1, 3600.0),
        max_auth_failures=limits_table.integer("max_auth_failures", 10, 0, 1_000_000),
    )

    raw_listeners = data.get("listeners")
    if raw_listeners is None or raw_listeners == []:
        raise ConfigError(file, "listeners", "missing: add at least one [[listeners]] table")
    if not isinstance(raw_listeners, list) or not all(isinstance(t, dict) for t in raw_listeners):
        raise ConfigError(file, "listeners", "expected [[listeners]] tables")
    listeners: list[ListenerConfig] = []
    names: set[str] = set()
    bound: set[tuple[str, str, int]] = set()
    for index, raw in enumerate(raw_listeners):
        table = Table(file, f"listeners[{index}]", raw)
        listener = parse_listener(table, base)
        if listener.name in names:
            raise table.error("name", f"duplicate listener name {show(listener.name)}")
        names.add(listener.name)
        address = (listener.family, listener.host, listener.port)
        if listener.port != 0 and listener.host and address in bound:
            raise table.error(
                "port",
                f"another {listener.family} listener already uses {listener.host} port {listener.port}",
            )
        bound.add(address)
        check_access(table, listener, roles, auth)
        listeners.append(listener)
    # Certificates another listener generates on start need not exist yet.
    secured = [
        (index, tls) for index, lc in enumerate(listeners) if (tls := lc.tls_settings) is not None
    ]
    generated = {(tls.cert, tls.key) for _, tls in secured if tls.generate_dev_cert}
    for index, tls in secured:
        if (tls.cert, tls.key) in generated and not tls.cert.exists():
            continue
        _check_tls_files(Table(file, f"listeners[{index}]", raw_listeners[index]), tls)
    return Config(
        path=path if path is not None else Path(file),
        gateway=gateway,
        limits=limits,
        listeners=tuple(listeners),
        cluster=cluster,
        admin=_admin(root),
        channels=_channels(root),
        roles=roles,
        auth=auth,
        history=history,
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
