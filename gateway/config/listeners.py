"""Listener settings: one frozen class per listener type, with defaults, and their parsing.

Every listener has ``name``, ``host``/``port`` (or, for stream listeners, an
``endpoint`` string), ``channel`` and ``echo``; each type adds only its own keys.
``LISTENER_CLASSES`` maps a ``type`` to its class.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, ClassVar

from gateway.config.tables import Table, show
from gateway.core.channels import NAME_RULE, is_name
from gateway.tls.files import TLS_VERSIONS, TlsSettings

WELCOME_FIELDS = ("count", "peer", "name", "user")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
LOOPBACK_ONLY = ("127.0.0.0/8", "::1/128")
MAX_UDP_PAYLOAD = 65507
LISTEN_BACKLOG = 4096
"""Pending connections the kernel may hold per stream port (it caps this at somaxconn)."""


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    """Keys every listener has."""

    type: ClassVar[str] = ""
    family: ClassVar[str] = "stream"
    """``stream`` or ``datagram``: two listeners of one family cannot share a port."""
    KEYS: ClassVar[tuple[str, ...]] = (
        "name",
        "type",
        "host",
        "port",
        "channel",
        "echo",
        "anonymous_role",
        "auth",
        "presence",
    )

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    channel: str = "main"
    echo: bool = False
    # The role of peers that did not sign in; None: they must (with ``auth``), or, without
    # ``auth`` either, the listener is open to everyone (allowed on local listeners only).
    anonymous_role: str | None = None
    auth: tuple[str, ...] = ()  # the sign-in methods accepted (AUTH_METHODS)
    # Whether this listener's JSON clients get peer lists and join/leave events.
    presence: bool = True

    @property
    def local(self) -> bool:
        """Whether only this host can reach the listener (bound to loopback)."""
        return ip_address(self.host).is_loopback

    @property
    def tls_settings(self) -> TlsSettings | None:
        """The certificate material of a ``tls``/``wss`` listener; None for the others."""
        return None

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        """This type's own keys from ``table`` (the common ones are read by ``parse_listener``)."""
        return {}


@dataclass(frozen=True, kw_only=True)
class StreamListenerConfig(ListenerConfig):
    """Keys of every listener over a byte stream (tcp, tls, ws, wss)."""

    KEYS: ClassVar[tuple[str, ...]] = (*ListenerConfig.KEYS, "endpoint", "welcome")

    welcome: str = ""
    endpoint: str | None = None  # a Twisted server endpoint string instead of host/port

    @property
    def local(self) -> bool:
        """Bound to loopback, or a ``unix:`` socket (its file permissions guard it); any
        other endpoint string may be reachable from elsewhere."""
        if self.endpoint is not None:
            return self.endpoint.startswith("unix:")
        return super().local

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        return {"welcome": _welcome(table)}


@dataclass(frozen=True, kw_only=True)
class TcpListenerConfig(StreamListenerConfig):
    """``type = "tcp"``: newline-terminated lines, or binary messages (``framing``)."""

    type: ClassVar[str] = "tcp"
    KEYS: ClassVar[tuple[str, ...]] = (
        *StreamListenerConfig.KEYS,
        "quit_command",
        "format",
        "framing",
    )

    quit_command: str = ""
    format: str = "raw"  # or "json": one JSON envelope per line, both ways
    framing: str = "lines"  # or "u16", "u32" (length-prefixed), "chunks" (a byte stream)

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        return {
            **super().read(table, base),
            "quit_command": table.string("quit_command", ""),
            "format": _format(table),
            "framing": _framing(table),
        }


_TLS_KEYS = ("cert", "key", "client_ca", "min_tls", "generate_dev_cert")


@dataclass(frozen=True, kw_only=True)
class _Secure(ListenerConfig):
    """What TLS adds to a stream listener type (``tls`` to ``tcp``, ``wss`` to ``ws``)."""

    tls: TlsSettings

    @property
    def tls_settings(self) -> TlsSettings:
        return self.tls

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        return {**super().read(table, base), "tls": _tls(table, base)}


@dataclass(frozen=True, kw_only=True)
class TlsListenerConfig(_Secure, TcpListenerConfig):
    """``type = "tls"``: the lines of ``tcp`` over TLS."""

    type: ClassVar[str] = "tls"
    KEYS: ClassVar[tuple[str, ...]] = (*TcpListenerConfig.KEYS, *_TLS_KEYS)


@dataclass(frozen=True, kw_only=True)
class WsListenerConfig(StreamListenerConfig):
    """``type = "ws"``: the browser page at ``/`` and the WebSocket at ``/ws``."""

    type: ClassVar[str] = "ws"
    KEYS: ClassVar[tuple[str, ...]] = (
        *StreamListenerConfig.KEYS,
        "ping_interval",
        "allowed_origins",
    )

    ping_interval: float = 30.0
    allowed_origins: tuple[str, ...] | None = None  # None: same origin only

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        return {
            **super().read(table, base),
            "ping_interval": table.number("ping_interval", 30.0, 0.0, 3600.0),
            "allowed_origins": _origins(table),
        }


@dataclass(frozen=True, kw_only=True)
class WssListenerConfig(_Secure, WsListenerConfig):
    """``type = "wss"``: the ``ws`` site over TLS."""

    type: ClassVar[str] = "wss"
    KEYS: ClassVar[tuple[str, ...]] = (*WsListenerConfig.KEYS, *_TLS_KEYS)


@dataclass(frozen=True, kw_only=True)
class UdpListenerConfig(ListenerConfig):
    """``type = "udp"``: one datagram per message; peers learnt from their datagrams."""

    type: ClassVar[str] = "udp"
    family: ClassVar[str] = "datagram"
    KEYS: ClassVar[tuple[str, ...]] = (
        *ListenerConfig.KEYS,
        "peer_timeout",
        "max_peers",
        "allow",
        "challenge",
        "format",
    )

    peer_timeout: float = 60.0
    max_peers: int = 1024
    allow: tuple[IPv4Network | IPv6Network, ...] = tuple(ip_network(n) for n in LOOPBACK_ONLY)
    challenge: bool = False
    format: str = "raw"  # or "json": one JSON envelope per datagram, both ways

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        return {
            "format": _format(table),
            "peer_timeout": table.number("peer_timeout", 60.0, 0.1, 86400.0),
            "max_peers": table.integer("max_peers", 1024, 1, 1_000_000),
            "allow": table.networks("allow", LOOPBACK_ONLY),
            "challenge": table.boolean("challenge", False),
        }


DEFAULT_MTU = 1400
"""The ciphertext MTU a ``dtls`` listener assumes: an Ethernet path (1500) minus IP and UDP
headers, with room for tunnels."""


@dataclass(frozen=True, kw_only=True)
class DtlsListenerConfig(_Secure, UdpListenerConfig):
    """``type = "dtls"``: UDP under DTLS 1.2; one record per message, peers by their sessions."""

    type: ClassVar[str] = "dtls"
    KEYS: ClassVar[tuple[str, ...]] = (
        *(key for key in UdpListenerConfig.KEYS if key != "challenge"),
        *(key for key in _TLS_KEYS if key != "min_tls"),
        "welcome",
        "mtu",
    )

    welcome: str = ""
    mtu: int = DEFAULT_MTU  # the ciphertext MTU: no record (so no message) is ever larger
    # Not a key here: the DTLS cookie exchange always proves a source receives at its address.
    challenge: bool = True

    @classmethod
    def read(cls, table: Table, base: Path) -> dict[str, Any]:
        udp = UdpListenerConfig.read(table, base)
        del udp["challenge"]  # the DTLS cookie exchange is the challenge, always on
        return {
            **udp,
            "tls": _tls(table, base),
            "welcome": _welcome(table),
            "mtu": table.integer("mtu", DEFAULT_MTU, 576, 65507),
        }


LISTENER_CLASSES: dict[str, type[ListenerConfig]] = {
    cls.type: cls
    for cls in (
        TcpListenerConfig,
        TlsListenerConfig,
        WsListenerConfig,
        WssListenerConfig,
        UdpListenerConfig,
        DtlsListenerConfig,
    )
}
LISTENER_TYPES = tuple(LISTENER_CLASSES)


def parse_listener(table: Table, base: Path) -> ListenerConfig:
    """One ``[[listeners]]`` table; paths are relative to ``base``."""
    kind = table.string("type")
    cls = LISTENER_CLASSES.get(kind)
    if cls is None:
        raise table.error("type", f"expected one of {', '.join(LISTENER_TYPES)}, got {show(kind)}")
    table.check_keys(cls.KEYS)
    endpoint = _endpoint(table) if issubclass(cls, StreamListenerConfig) else None
    common: dict[str, Any] = {
        "name": table.string("name", pattern=NAME_RE, what="a name of letters, digits, . _ : -"),
        "host": table.host() if endpoint is None else "",
        "port": table.integer("port", None, 0, 65535) if endpoint is None else 0,
        "channel": _channel(table),
        "echo": table.boolean("echo", False),
        "anonymous_role": table.string("anonymous_role", "") or None,
        "auth": _auth_methods(table),
        "presence": table.boolean("presence", True),
    }
    if endpoint is not None:
        common["endpoint"] = endpoint
    return cls(**common, **cls.read(table, base))


FORMATS = ("raw", "json")
FRAMINGS = ("lines", "u16", "u32", "chunks")
"""How a ``tcp``/``tls`` listener's peers delimit messages (``docs/protocol.md``)."""
LINES_ONLY = ("welcome", "quit_command")
"""Keys that only a ``framing = "lines"`` listener takes."""
AUTH_METHODS = ("password", "token", "jwt", "cert")
"""The sign-in methods a listener's ``auth`` may list."""


def _auth_methods(table: Table) -> tuple[str, ...]:
    value = table.data.get("auth", [])
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise table.error(
            "auth",
            f'expected a list of sign-in methods such as ["password", "token"], got {show(value)}',
        )
    for method in value:
        if method not in AUTH_METHODS:
            raise table.error(
                "auth", f'expected "password", "token", "jwt" or "cert", got {show(method)}'
            )
    return tuple(dict.fromkeys(value))


def _format(table: Table) -> str:
    value = table.string("format", "raw")
    if value not in FORMATS:
        raise table.error("format", f'expected "raw" or "json", got {show(value)}')
    return value


def _framing(table: Table) -> str:
    value = table.string("framing", "lines")
    if value not in FRAMINGS:
        raise table.error(
            "framing", f'expected "lines", "u16", "u32" or "chunks", got {show(value)}'
        )
    if value == "lines":
        return value
    if table.data.get("format", "raw") != "raw":
        raise table.error("format", f'"json" needs framing = "lines", not {show(value)}')
    for key in LINES_ONLY:
        if table.data.get(key):
            raise table.error(key, f'applies to framing = "lines" only, not {show(value)}')
    if value == "chunks" and set(table.data.get("auth") or ()) - {"cert"}:
        raise table.error(
            "auth",
            'framing = "chunks" keeps no message boundaries, so it signs in by "cert" only',
        )
    return value


def _channel(table: Table) -> str:
    name = table.string("channel", "main")
    if not is_name(name):
        raise table.error("channel", f"expected {NAME_RULE}, got {show(name)}")
    return name


def _welcome(table: Table) -> str:
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


def _tls(table: Table, base: Path) -> TlsSettings:
    cert = table.path("cert", base, required=True)
    key = table.path("key", base, required=True)
    assert cert is not None and key is not None
    min_tls = table.string("min_tls", "1.2")
    if min_tls not in TLS_VERSIONS:
        raise table.error("min_tls", f'expected "1.2" or "1.3", got {show(min_tls)}')
    return TlsSettings(
        cert=cert,
        key=key,
        client_ca=table.path("client_ca", base, required=False),
        min_tls=min_tls,
        generate_dev_cert=table.boolean("generate_dev_cert", False),
    )


def _origins(table: Table) -> tuple[str, ...] | None:
    if "allowed_origins" not in table.data:
        return None
    value = table.data["allowed_origins"]
    if not isinstance(value, list) or not all(isinstance(o, str) and o for o in value):
        raise table.error(
            "allowed_origins",
            f'expected a list of origins such as ["https://example.com"] or ["*"], got {show(value)}',
        )
    for origin in value:
        if origin != "*" and not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]+$", origin):
            raise table.error(
                "allowed_origins",
                f'expected origins like "https://example.com:8443" (scheme://host[:port], '
                f"no path), got {show(origin)}",
            )
    return tuple(origin.lower() for origin in value)


def _endpoint(table: Table) -> str | None:
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
            f"got {show(text)} (unknown type {show(kind)})",
        )
    return text


def _endpoint_types() -> set[str]:
    """Server endpoint types Twisted knows: its built-in ones and installed plugins."""
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    builtin = {"tcp", "tcp6", "unix", "ssl", "systemd", "haproxy"}
    return builtin | {p.prefix for p in getPlugins(IStreamServerEndpointStringParser)}
