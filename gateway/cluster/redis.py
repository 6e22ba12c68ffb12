"""Connections to Redis: the address from the ``[cluster] redis`` URL, and one publishing and one subscribed link."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

# The Redis address


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is, from a ``redis://`` or ``rediss://`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The address for logs: never the password."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_redis_url(url: str) -> RedisAddress:
    """Read ``redis[s]://[[user]:password@]host[:port][/db]``.

    The database number is accepted and ignored: Redis pub/sub does not
    depend on it (the prefix separates clusters).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected redis:// or rediss://, got {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if password is None and username is not None:
        # redis://secret@host: a password alone, as redis-cli -u reads it.
        username, password = None, username
    return RedisAddress(
        parts.hostname or "127.0.0.1", port, parts.scheme == "rediss", username, password
    )


# The connections


class Publisher(txredisapi.RedisProtocol):  # type: ignore[misc]
    """The connection that publishes; reports its loss to its link."""

    def __init__(self, lost: Callable[[Failure], None]) -> None:
        super().__init__(charset=None, convertNumbers=False)
        self._lost = lost

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self._lost(why)


class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """The subscribed connection; hands each publication to ``received``."""

    def __init__(
        self,
        received: Callable[[bytes, bytes, bytes | None], None],
        lost: Callable[[Failure], None],
    ) -> None:
        super().__init__(charset=None, convertNumbers=False)
        self._received = received
        self._lost = lost

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self._received(channel, message, pattern)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self._lost(why)


class OneConnection(Factory):
    """Connects one given protocol (``connectProtocol`` without its log lines)."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


class Link:
    """One connected period: a publishing and a subscribed connection.

    It ends, once, when either connection goes or Redis stops answering;
    ending aborts both, so the backplane starts over with a fresh pair.
    """

    def __init__(self) -> None:
        self.publisher: Publisher | None = None
        self.subscriber: Subscriber | None = None
        self.ended: Deferred[str] = Deferred()
        self.checking = False

    def end(self, reason: str) -> None:
        if self.ended.called:
            return
        for connection in (self.publisher, self.subscriber):
            if connection is not None and connection.transport is not None:
                connection.transport.abortConnection()
        self.ended.callback(reason)

    def lost(self, why: Failure) -> None:
        self.end(f"connection lost ({why.getErrorMessage()})")


def describe_failure(failure: Failure | BaseException) -> str:
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, CancelledError | TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


def redis_endpoint(reactor: Any, address: RedisAddress, timeout: float) -> IStreamClientEndpoint:
    """Where to connect for ``address`` (under TLS for ``rediss://``)."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, address.host, address.port, timeout=timeout
    )
    if address.tls:
        endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
    return endpoint
