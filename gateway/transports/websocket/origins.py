"""Which browser pages may open a WebSocket: the ``Origin`` header against ``allowed_origins``."""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _origin_parts(origin: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme)
    return parts.scheme, parts.hostname, port


class OriginPolicy:
    """Which browser pages may open a WebSocket (checked against the ``Origin`` header).

    ``allowed`` is ``None`` for same-origin only (the Origin's host and port
    equal the ``Host`` header's, a missing port meaning the default of the
    Origin's scheme), ``("*",)`` for any page, or a list of
    ``scheme://host[:port]`` origins. Requests without an Origin header come
    from non-browser clients and are always allowed.
    """

    def __init__(self, allowed: tuple[str, ...] | None) -> None:
        self.any = allowed is not None and "*" in allowed
        self.same_origin = allowed is None
        self.listed = {
            parts
            for parts in (_origin_parts(origin) for origin in allowed or ())
            if parts is not None
        }

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a handshake with these ``Origin`` and ``Host`` headers may proceed."""
        if not origin or self.any:
            return True
        parts = _origin_parts(origin)
        if parts is None:  # "null" (sandboxed pages, file://) or garbage
            return False
        if not self.same_origin:
            return parts in self.listed
        if not host:
            return False
        try:
            target = urlsplit("//" + host.strip().lower())
            host_port = target.port
        except ValueError:
            return False
        scheme, origin_host, origin_port = parts
        if host_port is None:
            host_port = _DEFAULT_PORTS.get(scheme)
        return origin_host == target.hostname and origin_port == host_port
