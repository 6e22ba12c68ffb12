"""Refusing source addresses that keep failing to sign in (brute force).

Past ``limit`` failed sign-ins from one IP within a minute, new connections
from it are refused for ``ban`` seconds. The table of addresses is bounded
(``max_sources``): when full, the oldest entries go first, so a spray of
sources costs bounded memory (and at worst forgets some counts).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime

WINDOW = 60.0
"""Failures are counted per source over this many seconds."""
BAN = 60.0
"""Seconds a source that went over the limit is refused."""


class Lockout:
    """Failed sign-ins per source IP, and which sources are refused for now."""

    def __init__(self, clock: IReactorTime, limit: int, max_sources: int = 100_000) -> None:
        self.clock = clock
        self.limit = limit  # 0: never refuse
        self.max_sources = max_sources
        # ip -> (start of its window, failures in it); refused sources: ip -> until.
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()

    def failed(self, ip: str) -> bool:
        """Count a failed sign-in from ``ip``; True when that put it over the limit."""
        if self.limit <= 0:
            return False
        now = self.clock.seconds()
        start, count = self._failures.pop(ip, (now, 0))
        if now - start >= WINDOW:
            start, count = now, 0
        count += 1
        if count > self.limit:
            self._refused.pop(ip, None)
            self._refused[ip] = now + BAN
            _bound(self._refused, self.max_sources)
            return True
        self._failures[ip] = (start, count)
        _bound(self._failures, self.max_sources)
        return False

    def refused(self, ip: str) -> bool:
        """Whether new connections from ``ip`` are refused now."""
        until = self._refused.get(ip)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._refused[ip]
            return False
        return True


def _bound(table: OrderedDict[str, Any], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)
