"""Flow control: what keeps one peer from costing the others memory or time.

- ``Backlog``: per receiver, how much may wait beyond its transport's buffer
  (Twisted pauses a registered producer once that buffer holds 64 KiB).
- ``FlowControl``: gateway-wide, the total waiting; over its limit every stream
  sender's reading is paused until it drains.
- ``StreamFlow``: all of the above for one stream connection, which it also
  pauses from reading while backpressure or its rate limit says so.
- ``TokenBucket``: the inbound message rate limit.
- ``ConnectionGate``: connection caps, total and per IP.
- ``RateLimitedLog``: at most one line per second per cause, with a count of
  what was suppressed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IPullProducer, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Limits
from gateway.message import Origin
from gateway.metrics import Metrics


class RateLimitedLog:
    """Log a recurring event at most once per ``interval`` seconds per cause."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 1.0) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, key: str, text: str, **fields: Any) -> None:
        cause = key
        now = self.clock.seconds()
        last = self._last.get(cause)
        if last is not None and now - last < self.interval:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return
        self._last[cause] = now
        suppressed = self._suppressed.pop(cause, 0)
        if suppressed:
            text += " ({suppressed} more like this suppressed)"
        self.log.warn(text, suppressed=suppressed, **fields)


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


BACKPRESSURE = 1
RATE_LIMIT = 2


class FlowControl:
    """Gateway-wide accounting of bytes waiting for slow receivers."""

    log = Logger()

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limit = limits.max_total_pending_bytes
        self.metrics = metrics
        self.total_pending = 0
        self.readers: set[StreamFlow] = set()
        self.backpressure = False

    def add(self, size: int) -> None:
        self.total_pending += size
        if not self.backpressure and self.total_pending > self.limit:
            self.backpressure = True
            self.log.warn(
                "{pending} bytes wait for slow receivers (limit {limit}): pausing every sender",
                pending=self.total_pending,
                limit=self.limit,
            )
            for reader in list(self.readers):
                reader.pause_reading(BACKPRESSURE)

    def remove(self, size: int) -> None:
        self.total_pending -= size
        # Resume at half the limit, so senders are not flipped on and off.
        if self.backpressure and self.total_pending <= self.limit // 2:
            self.backpressure = False
            self.log.info("slow receivers drained: senders resume")
            for reader in list(self.readers):
                reader.resume_reading(BACKPRESSURE)

    def register(self, reader: StreamFlow) -> None:
        self.readers.add(reader)
        if self.backpressure:
            reader.pause_reading(BACKPRESSURE)

    def unregister(self, reader: StreamFlow) -> None:
        self.readers.discard(reader)


class BacklogOwner(Protocol):
    """Who a backlog reports to."""

    def slow(self) -> None:
        """The receiver fell more than the limit behind (policy "disconnect")."""

    def log_drop(self, started: bool, count: int) -> None:
        """Dropping for the receiver started, or ended after ``count`` messages."""


class FlowOwner(Protocol):
    """The peer a ``StreamFlow`` belongs to."""

    @property
    def origin(self) -> Origin: ...

    def slow_consumer(self) -> None:
        """Close the peer: it does not read (after the gateway logged and counted it)."""

    def idle_timeout(self) -> None:
        """Close the peer: it sent nothing for ``limits.idle_timeout``."""


TRANSPORT_BUFFER = 64 * 1024
"""What a Twisted transport buffers before it pauses its producer."""


def count_lines(wire: bytes) -> int:
    """Messages in line-framed output."""
    return wire.count(b"\n")


def count_one(wire: bytes) -> int:
    """Messages in output that is one message (or whose count does not matter)."""
    return 1


@implementer(IPushProducer)
class Backlog:
    """What waits for one receiver beyond its transport's own buffer.

    Registered as the push producer of the receiver's transport: Twisted calls
    ``pauseProducing`` once the transport buffers 64 KiB and ``resumeProducing``
    when it has drained. While paused, ``admit`` lets at most ``limit`` more
    bytes through; past that the ``policy`` decides: "disconnect" calls
    ``on_overflow`` once, "drop" discards (and counts) until the receiver drains.
    ``count`` tells how many messages some output holds; it runs only on drops.
    The ``owner`` hears about overflows (``slow()``) and drop episodes
    (``log_drop(started, count)``).
    """

    streaming = True

    __slots__ = (
        "count",
        "dropped",
        "dropped_total",
        "dropping",
        "flow",
        "limit",
        "owner",
        "paused",
        "pending",
        "policy",
        "transport",
    )

    def __init__(
        self,
        flow: FlowControl,
        limits: Limits,
        owner: BacklogOwner,
        count: Callable[[bytes], int],
        transport: Any,
    ) -> None:
        self.transport = transport
        self.flow = flow
        self.limit = limits.max_pending_bytes
        self.policy = limits.slow_consumer
        self.owner = owner
        self.count = count
        self.paused = False
        self.pending = 0
        self.dropping = False
        self.dropped = 0
        self.dropped_total = 0

    def write(self, wire: bytes) -> None:
        """Write ``wire`` to the transport, within the backlog's limits."""
        if self.paused and not self.admit(wire):
            return
        self.transport.write(wire)

    def admit(self, wire: bytes) -> bool:
        """May ``wire`` be written now? Call only while paused."""
        if self.dropping:
            self._drop(wire)
            return False
        size = len(wire)
        if self.pending + size <= self.limit:
            self.pending += size
            self.flow.add(size)
            return True
        if self.policy == "drop":
            self.dropping = True
            self.dropped = 0
            self._drop(wire)
            self.owner.log_drop(True, self.dropped)
            return False
        self.owner.slow()
        return False

    def _drop(self, wire: bytes) -> None:
        messages = self.count(wire)
        self.dropped += messages
        self.dropped_total += messages
        self.flow.metrics.drop("slow_consumer", messages)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.release()
        if self.dropping:
            self.dropping = False
            self.owner.log_drop(False, self.dropped)
            self.dropped = 0

    def stopProducing(self) -> None:
        self.release()

    def release(self) -> None:
        """Forget what was counted as waiting (drained, or the connection is gone)."""
        if self.pending:
            self.flow.remove(self.pending)
            self.pending = 0


@implementer(IPullProducer)
class WriteThrough(Backlog):
    """A backlog that also writes straight to an idle socket.

    Twisted's ``transport.write`` always buffers, then costs two ``epoll_ctl``
    calls and a loop turn before the ``send``. Registered as a *pull* producer,
    this backlog hears from Twisted whenever the transport's buffer has drained
    (``resumeProducing``), so it knows when nothing is queued: then output goes
    to the socket at once with one ``send``, and only what the socket does not
    take is handed to the transport. Bytes never overtake each other: while the
    transport holds anything, everything goes through it. Only for transports
    that nobody else writes to behind our back (plain TCP line peers).
    """

    streaming = False

    __slots__ = ("idle", "queued", "send")

    def __init__(
        self,
        flow: FlowControl,
        limits: Limits,
        owner: BacklogOwner,
        count: Callable[[bytes], int],
        transport: Any,
    ) -> None:
        super().__init__(flow, limits, owner, count, transport)
        self.send = transport.getHandle().send
        self.idle = True
        self.queued = 0

    def write(self, wire: bytes) -> None:
        """Send ``wire`` now if nothing is queued, else queue it (within the limits)."""
        if self.idle:
            try:
                sent = self.send(wire)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: the transport will find out and close
            if sent == len(wire):
                return
            self.idle = False
            self.queued = len(wire) - sent
            self.transport.write(wire[sent:])
        elif self.paused:
            if self.admit(wire):
                self.transport.write(wire)
        else:
            self.queued += len(wire)
            if self.queued > TRANSPORT_BUFFER:
                self.paused = True
            self.transport.write(wire)

    def resumeProducing(self) -> None:
        """Twisted: the transport's buffer is empty."""
        self.idle = True
        self.queued = 0
        super().resumeProducing()


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


class FlowContext:
    """Everything flow control shares across one gateway's stream peers."""

    log = Logger()

    def __init__(self, limits: Limits, metrics: Metrics, clock: IReactorTime) -> None:
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.flow = FlowControl(limits, metrics)
        self.warnings = RateLimitedLog(self.log, clock)
        self.gate = ConnectionGate(limits, metrics, self.warnings)

    def reconfigure(self, limits: Limits) -> None:
        """New limits (a config reload): caps and the total apply at once, the rest to new peers."""
        self.limits = limits
        self.flow.limit = limits.max_total_pending_bytes
        self.gate.max_connections = limits.max_connections
        self.gate.max_per_ip = limits.max_connections_per_ip


class StreamFlow:
    """Flow control of one stream connection (TCP, TLS or WebSocket).

    ``admit`` applies the connection caps; ``start`` (once the peer joins)
    registers the backlog as the transport's producer, the read gate with the
    gateway's backpressure, and the idle timer; ``received`` is called per
    batch read; ``stop`` undoes it all when the connection goes.
    """

    log = Logger()

    # Slots, no closures: one of these lives for every connection.
    __slots__ = (
        "_host",
        "_idle",
        "_resume",
        "_started",
        "backlog",
        "bucket",
        "context",
        "owner",
        "reading_paused",
        "transport",
    )

    def __init__(
        self,
        context: FlowContext,
        transport: Any,
        owner: FlowOwner,
        count: Callable[[bytes], int] = count_one,
        write_through: bool = False,
    ) -> None:
        self.context = context
        self.transport = transport
        self.owner = owner
        self.backlog: Backlog = (
            WriteThrough(context.flow, context.limits, self, count, transport)
            if write_through
            else Backlog(context.flow, context.limits, self, count, transport)
        )
        # Why reading is paused, as bits (BACKPRESSURE, RATE_LIMIT); 0 = reading.
        self.reading_paused = 0
        limits = context.limits
        self.bucket = (
            TokenBucket(limits.max_messages_per_second, context.clock)
            if limits.max_messages_per_second > 0
            else None
        )
        self._host: str | None = None
        self._idle: IDelayedCall | None = None
        self._resume: IDelayedCall | None = None
        self._started = False

    def admit(self, host: str, listener: str) -> bool:
        """Apply the connection caps; False means close the connection now."""
        if not self.context.gate.admit(host, listener):
            return False
        self._host = host
        return True

    def adopt(self, host: str) -> None:
        """Take over a connection already counted against the caps (a WebSocket upgrade)."""
        self._host = host

    def start(self) -> None:
        self._started = True
        self.transport.registerProducer(self.backlog, self.backlog.streaming)
        self.context.flow.register(self)
        if self.context.limits.idle_timeout > 0:
            self._idle = self.context.clock.callLater(
                self.context.limits.idle_timeout, self._idle_expired
            )

    def received(self, messages: int) -> None:
        """The peer sent ``messages`` messages (0 for other traffic): idle and rate accounting."""
        if self._idle is not None:
            self._idle.reset(self.context.limits.idle_timeout)
        if self.bucket is not None and messages:
            deficit = self.bucket.take(messages)
            if deficit and self._resume is None:
                self.pause_reading(RATE_LIMIT)
                self.context.metrics.throttled += 1
                self._resume = self.context.clock.callLater(
                    deficit / self.bucket.rate, self._unthrottle
                )

    def slow(self) -> None:
        """BacklogOwner: the peer is over its backlog limit; log, count, close it."""
        self.log.warn(
            "{peer} is not reading: over {limit} bytes pending; disconnecting",
            peer=self.owner.origin.peer_id,
            limit=self.context.limits.max_pending_bytes,
        )
        self.context.metrics.disconnect("slow_consumer")
        self.owner.slow_consumer()

    def log_drop(self, started: bool, count: int) -> None:
        """BacklogOwner: a drop episode started or ended."""
        if started:
            self.log.warn(
                "{peer} is not reading: over {limit} bytes pending; dropping its messages "
                "until it catches up",
                peer=self.owner.origin.peer_id,
                limit=self.context.limits.max_pending_bytes,
            )
        else:
            self.log.info(
                "{peer} caught up; {count} messages were dropped for it",
                peer=self.owner.origin.peer_id,
                count=count,
            )

    def pause_reading(self, reason: int) -> None:
        """Stop reading from the peer while ``reason`` holds (with any other)."""
        if not self.reading_paused:
            self.transport.pauseProducing()
        self.reading_paused |= reason

    def resume_reading(self, reason: int) -> None:
        """``reason`` no longer holds; read again once no reason is left."""
        if not self.reading_paused & reason:
            return
        self.reading_paused &= ~reason
        if not self.reading_paused:
            self.transport.resumeProducing()

    def _unthrottle(self) -> None:
        self._resume = None
        self.resume_reading(RATE_LIMIT)

    def _idle_expired(self) -> None:
        self._idle = None
        self.context.metrics.disconnect("idle_timeout")
        self.owner.idle_timeout()

    def stop(self) -> None:
        """The connection is gone: release everything it held."""
        for call in (self._idle, self._resume):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._resume = None
        self.backlog.release()
        if self._started:
            self.context.flow.unregister(self)
        if self._host is not None:
            self.context.gate.release(self._host)
            self._host = None
