"""Connections to Redis: the address from the ``[cluster] redis`` URL, and one publishing and one subscribed link."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
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


class _Connection(txredisapi.RedisProtocol):  # type: ignore[misc]
    """What both connections share: they count their reads and report their loss."""

    heard = 0
    """Reads from Redis so far (replies, and publications, in order): the connection is
    alive while this moves."""

    _lost: Callable[[Failure], None]

    def dataReceived(self, data: bytes) -> None:
        self.heard += 1
        super().dataReceived(data)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self._lost(why)


class Publisher(_Connection):
    """The connection that publishes; reports its loss to its link."""

    def __init__(self, lost: Callable[[Failure], None]) -> None:
        super().__init__(charset=None, convertNumbers=False)
        self._lost = lost


class Subscriber(_Connection, txredisapi.SubscriberProtocol):  # type: ignore[misc]
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

    def check(self, reactor: IReactorTime, timeout: float) -> None:
        """PING both connections; end the link if one has not answered within ``timeout``
        seconds and nothing else came from it meanwhile.

        Redis answers in order, so a PONG waits behind the replies and publications sent
        before it: a node too busy to read them all in time (a broadcast to tens of
        thousands of peers) still hears its connection talk, and that connection is alive;
        it gets another ``timeout``. A stalled Redis sends nothing at all.
        """
        if self.checking or self.ended.called:
            return
        assert self.publisher is not None and self.subscriber is not None
        connections: tuple[_Connection, ...] = (self.publisher, self.subscriber)
        try:
            pings: list[Deferred[Any]] = [c.ping() for c in connections]
        except txredisapi.ConnectionError:
            self.end("connection lost")
            return
        self.checking = True
        heard = [c.heard for c in connections]
        timer: list[IDelayedCall] = []

        def verdict() -> None:
            waiting = [i for i, ping in enumerate(pings) if not ping.called]
            if not waiting or self.ended.called:
                return
            if any(connections[i].heard == heard[i] for i in waiting):
                self.end(f"Redis did not answer PING within {timeout:g} s")
                return
            heard[:] = [c.heard for c in connections]
            timer[:] = [reactor.callLater(timeout, expired)]

        def expired() -> None:
            # The replies already waiting in the sockets are read first (one poll).
            timer[:] = [reactor.callLater(0, verdict)]

        def done(result: object) -> None:
            self.checking = False
            for call in timer:
                if call.active():
                    call.cancel()
            if isinstance(result, Failure):
                self.end(f"Redis did not answer PING within {timeout:g} s")

        timer.append(reactor.callLater(timeout, expired))
        gatherResults(pings, consumeErrors=True).addBoth(done)


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
