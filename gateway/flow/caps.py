"""Caps: the inbound message rate (``TokenBucket``) and connection counts, in total and per source IP (``ConnectionGate``)."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from gateway.config.settings import Limits
from gateway.core.metrics import Metrics
from gateway.flow.ratelog import RateLimitedLog


class TokenBucket:
    """``rate`` messages per second with a burst of one second's worth (at least one)."""

    __slots__ = ("capacity", "clock", "rate", "tokens", "updated")

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.clock = clock
        self.tokens = self.capacity
        self.updated = clock.seconds()

    def take(self, count: int) -> float:
        """Spend ``count`` tokens; returns the deficit (0.0 when within the limit)."""
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= count
        return -self.tokens if self.tokens < 0 else 0.0

    def has(self, count: int) -> bool:
        """Spend ``count`` tokens only if they are all there (datagrams: drop, never owe)."""
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < count:
            return False
        self.tokens -= count
        return True


class ConnectionGate:
    """Connection caps over all stream listeners: in total and per source IP."""

    def __init__(self, limits: Limits, metrics: Metrics, log: RateLimitedLog) -> None:
        self.max_connections = limits.max_connections
        self.max_per_ip = limits.max_connections_per_ip
        self.metrics = metrics
        self.log = log
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, host: str, listener: str) -> bool:
        """Count a new connection from ``host``; False (counted and logged) when over a cap."""
        if self.total >= self.max_connections:
            self._refuse("max_connections", host, listener, self.max_connections)
            return False
        count = self.per_ip.get(host, 0)
        if self.max_per_ip and count >= self.max_per_ip:
            self._refuse("max_connections_per_ip", host, listener, self.max_per_ip)
            return False
        self.total += 1
        self.per_ip[host] = count + 1
        return True

    def release(self, host: str) -> None:
        """A connection counted by ``admit`` has gone."""
        self.total -= 1
        count = self.per_ip.get(host, 0) - 1
        if count > 0:
            self.per_ip[host] = count
        else:
            self.per_ip.pop(host, None)

    def _refuse(self, cause: str, host: str, listener: str, limit: int) -> None:
        self.metrics.disconnect(cause)
        self.log.emit(
            cause,
            'refused a connection from {host} on listener "{listener}": {cause} ({limit}) reached',
            host=host,
            listener=listener,
            cause=cause,
            limit=limit,
        )
