"""Stateless cookies: proof that a UDP source receives at the address it sends from.

The ``udp`` listener's challenge (``challenge = true``) and the DTLS cookie
exchange (RFC 6347 4.2.1) of ``dtls`` listeners both use them. A cookie is a
keyed hash (HMAC-SHA256, truncated) of the source address and a time window:
checking one needs no state per source, only the listener's secret and the
clock. A cookie made in the current or the previous window is accepted, so it
lives 30 to 60 seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from ipaddress import IPv6Address, ip_address
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

Address = tuple[str, int]
"""A UDP source: host (an IP address as text) and port."""

COOKIE_BYTES = 16
COOKIE_WINDOW = 30.0
"""Seconds per cookie window; a cookie is accepted in its window and the next."""
SECRET_BYTES = 32


def _source(address: Address) -> bytes:
    """The bytes a cookie binds to: packed IP (IPv4-mapped IPv6 as IPv4) and port."""
    host, port = address
    try:
        ip = ip_address(host)
    except ValueError:
        packed = host.encode("utf-8", "replace")
    else:
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        packed = ip.packed
    return packed + port.to_bytes(2, "big")


class Cookies:
    """Makes and checks the cookies of one listener."""

    def __init__(self, clock: IReactorTime, secret: bytes | None = None) -> None:
        """``secret`` defaults to a fresh random one: cookies die with the listener."""
        self.clock = clock
        self._secret = secret if secret is not None else os.urandom(SECRET_BYTES)

    def _window(self) -> int:
        return int(self.clock.seconds() // COOKIE_WINDOW)

    def _cookie(self, address: Address, window: int) -> bytes:
        text = _source(address) + window.to_bytes(8, "big", signed=True)
        return hmac.new(self._secret, text, hashlib.sha256).digest()[:COOKIE_BYTES]

    def make(self, address: Address) -> bytes:
        """The cookie for ``address`` now."""
        return self._cookie(address, self._window())

    def valid(self, address: Address, cookie: bytes) -> bool:
        """Whether ``cookie`` was made for ``address`` in this window or the previous one."""
        if len(cookie) != COOKIE_BYTES:
            return False
        window = self._window()
        return any(
            hmac.compare_digest(cookie, self._cookie(address, w)) for w in (window, window - 1)
        )
