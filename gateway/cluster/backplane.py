"""The Redis backplane: batches and presence to and from the other gateway nodes.

Every node keeps two connections to Redis: one that PUBLISHes each local
batch (one command per batch) on ``<prefix>:<channel>``, and one subscribed to
``<prefix>:*`` that hands the batches of the other nodes to the bus. A node
ignores what it published itself (by node id), so nothing loops and no peer
gets its own message back. Presence travels in the same Redis channel as the
messages, so a join is always seen before the messages of that peer.

Nothing here waits for Redis on the bus's path: ``forward`` writes and
returns. While Redis is unreachable, stalled or too slow, batches are dropped
and counted instead of queued (``metrics.dropped["backplane_down"]`` and
``["backplane_overflow"]``); local delivery never depends on Redis.

The client is txredisapi (Twisted-native, with the hiredis parser); see
docs/scaling.md for why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.cluster.inbox import Inbox
from gateway.cluster.interest import Command, Interest
from gateway.cluster.redis import (
    Link,
    OneConnection,
    Publisher,
    Subscriber,
    describe_failure,
    parse_redis_url,
    redis_endpoint,
)
from gateway.cluster.wire import (
    encode_batch,
    encode_presence,
)
from gateway.config import ClusterSettings
from gateway.core.bus import Bus
from gateway.core.channels import has_wildcard
from gateway.core.message import Batch, Origin

if TYPE_CHECKING:
    from gateway.cluster.archive import RedisArchive


class Backplane(Service):
    """A gateway node's link to the others through Redis pub/sub.

    ``startService`` connects in the background (the gateway serves local
    peers meanwhile) and keeps reconnecting with capped exponential backoff;
    ``is_up`` tells whether batches are being forwarded right now.
    """

    log = Logger()
    STABLE_AFTER = 5.0
    """Seconds a link must last for the next attempt to come at once, without backoff."""

    def __init__(
        self,
        settings: ClusterSettings,
        bus: Bus,
        reactor: Any,
        *,
        max_pending_bytes: int = 16 * 1024 * 1024,
        health_interval: float = 1.0,
        timeout: float = 2.0,
        min_retry: float = 0.5,
        max_retry: float = 10.0,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self.settings = settings
        self.node = settings.node
        self.bus = bus
        self.metrics = bus.metrics
        self.reactor = reactor
        self.address = parse_redis_url(settings.redis)
        self.max_pending_bytes = max_pending_bytes
        self.health_interval = health_interval
        self.timeout = timeout
        self.min_retry = min_retry
        self.max_retry = max_retry
        self._endpoint = (
            endpoint
            if endpoint is not None
            else redis_endpoint(reactor, self.address, self.timeout)
        )
        self._keys: dict[str, bytes] = {}
        # What this node's peers want from Redis (SUBSCRIBE / PSUBSCRIBE), and which
        # copy of a publication it takes.
        self.interest = Interest(settings.prefix)
        self.inbox = Inbox(bus, self.node, self.interest)
        # ``[history] store = "redis"`` (``keep_history``).
        self.archive: RedisArchive | None = None
        # Every frame starts with an array header, the version and the type (one
        # byte each), then the node id: this is how ours looks there.
        self._link: Link | None = None
        self._up: Link | None = None
        self._waiting: Deferred[Any] | None = None  # a Redis step or a backoff pause
        self._health: LoopingCall | None = None
        self._running: Deferred[None] | None = None
        self._pending_bytes = 0
        # Counters (the admin endpoint shows them).
        self.forwarded_batches = 0
        self.forwarded_messages = 0
        self.unforwarded = 0  # batches not forwarded (either reason below)
        self.dropped_down = 0  # messages not forwarded: Redis unreachable
        self.dropped_overflow = 0  # messages not forwarded: too many bytes awaiting Redis
        self.unconfirmed = (
            0  # batches written when a connection went (may or may not have gone out)
        )
        self.connects = 0
        self.outages = 0

    # State

    @property
    def is_up(self) -> bool:
        """True while both connections are up and Redis answers."""
        return self._up is not None

    @property
    def link(self) -> Link | None:
        """The link while it is up (both connections, Redis answering), else None."""
        return self._up

    @property
    def pending_bytes(self) -> int:
        """Bytes published and not yet acknowledged by Redis."""
        return self._pending_bytes

    def stats(self) -> dict[str, Any]:
        """The backplane's state and counters, for the admin endpoint."""
        return {
            "up": self.is_up,
            "node": self.node,
            "redis": self.address.describe(),
            "forwarded_batches": self.forwarded_batches,
            "forwarded_messages": self.forwarded_messages,
            "received_batches": self.inbox.batches,
            "received_messages": self.inbox.messages,
            "unforwarded_batches": self.unforwarded,
            "dropped_down": self.dropped_down,
            "dropped_overflow": self.dropped_overflow,
            "unconfirmed_batches": self.unconfirmed,
            "malformed": self.inbox.malformed,
            "pending_bytes": self._pending_bytes,
            "connects": self.connects,
            "outages": self.outages,
            **({} if self.archive is None else {"history": self.archive.stats()}),
        }

    # Outgoing (the bus calls these; they never wait)

    def forward(self, batch: Batch) -> None:
        """Publish a local batch for the other nodes, or drop and count it."""
        link = self._up
        if link is not None:
            data = encode_batch(self.node, batch)
            if self._pending_bytes + len(data) > self.max_pending_bytes:
                self._unforwarded(batch, "backplane_overflow")
                return
            if self._publish(link, self._key(batch.channel), data):
                self.forwarded_batches += 1
                self.forwarded_messages += len(batch.payloads)
                return
        self._unforwarded(batch, "backplane_down")

    def _unforwarded(self, batch: Batch, reason: str) -> None:
        count = len(batch.payloads)
        self.unforwarded += 1
        if reason == "backplane_down":
            self.dropped_down += count
        else:
            self.dropped_overflow += count
        self.metrics.drop(reason, count)

    def presence(self, event: str, origin: Origin, channel: str) -> None:
        """Tell the other nodes a local peer joined or left (lost while Redis is down)."""
        link = self._up
        if link is None:
            return
        data = encode_presence(self.node, event, origin, channel)
        if self._pending_bytes + len(data) <= self.max_pending_bytes:
            self._publish(link, self._key(channel), data)

    def subscribed(self, subscription: str) -> None:
        """The first local peer subscribed to ``subscription``: listen for it on Redis."""
        self._send_interest(self.interest.want(subscription))

    def unsubscribed(self, subscription: str) -> None:
        """The last local subscriber of ``subscription`` left: stop listening for it."""
        self._send_interest(self.interest.unwant(subscription))

    def _send_interest(self, command: Command | None) -> None:
        link = self._link
        if command is None or link is None or link.ended.called or link.subscriber is None:
            return  # a new connection subscribes to everything wanted then
        if link.subscriber.transport is None:
            return  # still connecting: it subscribes to what is wanted once connected
        self._subscribe(link, command).addErrback(
            lambda f: link.end(f"Redis refused {command[0]}: {describe_failure(f)}")
        )

    def _subscribe(self, link: Link, command: Command) -> Deferred[None]:
        assert link.subscriber is not None
        verb, name = command
        reply: Deferred[Any] = link.subscriber.execute_command(verb, name, apply_timeout=False)
        return reply.addCallback(lambda _: self._confirmed(command))

    def _confirmed(self, command: Command) -> None:
        self.interest.confirmed(command)
        if self.archive is not None and command[0] == "SUBSCRIBE":
            self.archive.confirmed(command[1])

    def _key(self, channel: str) -> bytes:
        key = self._keys.get(channel)
        if key is None:
            key = self._keys[channel] = f"{self.settings.prefix}:{channel}".encode()
        return key

    def _publish(self, link: Link, key: bytes, data: bytes) -> bool:
        publisher = link.publisher
        assert publisher is not None
        try:
            reply: Deferred[Any] = publisher.execute_command("PUBLISH", key, data)
        except txredisapi.ConnectionError:
            return False
        self._pending_bytes += len(data)
        reply.addBoth(self._published, len(data))
        return True

    def _published(self, result: object, size: int) -> None:
        self._pending_bytes -= size
        if isinstance(result, Failure):
            self.unconfirmed += 1

    # Lifecycle

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._running = Deferred.fromCoroutine(self._run())
        self._running.addErrback(
            lambda f: self.log.failure("backplane stopped unexpectedly", failure=f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        link = self._up
        if link is not None:
            # Tell the other nodes our peers are leaving, then close.
            for peer in self.bus.peers():
                for channel in self.bus.subscriptions(peer):
                    if not has_wildcard(channel):
                        self.presence("leave", peer.origin, channel)
            self._went_down(link, "")
            try:
                assert link.publisher is not None
                ping: Deferred[Any] = link.publisher.ping()
                await ping.addTimeout(self.timeout, self.reactor)
            except Exception:
                pass
        if self._link is not None:
            self._link.end("stopping")
        if self._waiting is not None:
            self._waiting.cancel()  # a connection attempt or a backoff pause
        if self._running is not None:
            await self._running

    async def _run(self) -> None:
        delay = self.min_retry
        failures = 0
        while self.running:
            link = self._link = Link()
            try:
                await self._connect(link)
            except Exception as e:
                link.end("connect failed")
                if not self.running:
                    return
                failures += 1
                self._connect_failed(e, failures, delay)
            else:
                if not self.running:
                    link.end("stopping")
                    return
                failures = 0
                since = self.reactor.seconds()
                self._went_up(link)
                reason = await link.ended
                self._went_down(link, reason)
                if self.reactor.seconds() - since >= self.STABLE_AFTER:
                    delay = self.min_retry
                    continue  # at once: a link that lasted is worth trying again now
            # Wait before trying again, longer each time, so a Redis that keeps
            # refusing (or accepting and dropping) us is not hammered.
            self._waiting = deferLater(self.reactor, delay, lambda: None)
            try:
                await self._waiting
            except CancelledError:
                return
            finally:
                self._waiting = None
            delay = min(delay * 2, self.max_retry)

    async def _connect(self, link: Link) -> None:
        publisher = Publisher(link.lost)
        link.publisher = publisher
        await self._in_time(self._endpoint.connect(OneConnection(publisher)))
        await self._prepare(publisher)
        subscriber = Subscriber(self.inbox.received, link.lost)
        link.subscriber = subscriber
        await self._in_time(self._endpoint.connect(OneConnection(subscriber)))
        await self._prepare(subscriber)
        for command in self.interest.wanted():
            await self._in_time(self._subscribe(link, command))
        if self.archive is not None:
            await self._in_time(self.archive.prepare(link))
        if link.ended.called:
            raise ConnectionError(link.ended.result)

    async def _prepare(self, connection: Any) -> None:
        """Authenticate when the URL has a password; PING (a stalled Redis accepts TCP)."""
        password = self.address.password
        if password is not None:
            await self._in_time(connection.auth(password, self.address.username))
        await self._in_time(connection.ping())

    async def _in_time(self, d: Deferred[Any]) -> Any:
        self._waiting = d.addTimeout(self.timeout, self.reactor)
        try:
            return await d
        finally:
            self._waiting = None

    def _connect_failed(self, error: BaseException, failures: int, delay: float) -> None:
        if failures == 1:
            self.log.warn(
                "backplane: cannot reach Redis at {redis} ({reason}); serving local peers only, "
                "retrying in the background",
                redis=self.address.describe(),
                reason=describe_failure(error),
            )
        else:
            self.log.debug(
                "backplane: attempt {attempt} to reach Redis failed ({reason}); next in {delay} s",
                attempt=failures,
                reason=describe_failure(error),
                delay=delay,
            )

    def _went_up(self, link: Link) -> None:
        self._up = link
        self.connects += 1
        self.log.info(
            "backplane up: node {node} on {redis}, listening for {count} channels and patterns",
            node=self.node,
            redis=self.address.describe(),
            count=len(self.interest.wanted()),
        )
        if self.archive is not None:
            self.archive.went_up()
        health = self._health = LoopingCall(self._check, link)
        health.clock = self.reactor
        health.start(self.health_interval, now=False).addErrback(
            lambda f: self.log.failure("backplane health check failed", failure=f)
        )

    def _went_down(self, link: Link, reason: str) -> None:
        if self._up is not link:
            return
        self._up = None
        self.interest.reset()
        if self.archive is not None:
            self.archive.went_down()
        if self._health is not None and self._health.running:
            self._health.stop()
        self._health = None
        if reason:
            self.outages += 1
            self.log.warn(
                "backplane down: {reason}; local delivery continues, batches for other nodes "
                "are dropped until Redis is back",
                reason=reason,
            )

    def _check(self, link: Link) -> None:
        link.check(self.reactor, self.timeout)
