"""Flow control of one stream connection, and what all of them share.

- ``Governor``: one per gateway: the limits, the connection caps, the
  backpressure total and the rate-limited warnings every stream peer shares.
- ``ConnectionFlow``: one per connection: its backlog, its read gate (paused
  for backpressure or its rate limit), its idle timer and its place in the caps.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from gateway.config.settings import Limits
from gateway.core.interfaces import IFramer
from gateway.core.message import Origin
from gateway.core.metrics import Metrics
from gateway.flow.backlog import Backlog, WriteThrough
from gateway.flow.backpressure import RATE_LIMIT, Backpressure
from gateway.flow.caps import ConnectionGate, TokenBucket
from gateway.flow.ratelog import RateLimitedLog


class FlowOwner(Protocol):
    """The peer a ``ConnectionFlow`` belongs to."""

    @property
    def origin(self) -> Origin: ...

    @property
    def framer(self) -> IFramer: ...

    def slow_consumer(self) -> None:
        """Close the peer: it does not read (after the gateway logged and counted it)."""

    def idle_timeout(self) -> None:
        """Close the peer: it sent nothing for ``limits.idle_timeout``."""


class Governor:
    """Everything flow control shares across one gateway's stream peers."""

    log = Logger()

    def __init__(self, limits: Limits, metrics: Metrics, clock: IReactorTime) -> None:
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.backpressure = Backpressure(limits, metrics)
        self.warnings = RateLimitedLog(self.log, clock)
        self.gate = ConnectionGate(limits, metrics, self.warnings)

    def reconfigure(self, limits: Limits) -> None:
        """New limits (a config reload): caps and the total apply at once, the rest to new peers."""
        self.limits = limits
        self.backpressure.limit = limits.max_total_pending_bytes
        self.gate.max_connections = limits.max_connections
        self.gate.max_per_ip = limits.max_connections_per_ip


class ConnectionFlow:
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
        "governor",
        "owner",
        "reading_paused",
        "transport",
    )

    def __init__(
        self,
        governor: Governor,
        transport: Any,
        owner: FlowOwner,
        write_through: bool = False,
    ) -> None:
        self.governor = governor
        self.transport = transport
        self.owner = owner
        kind = WriteThrough if write_through else Backlog
        self.backlog: Backlog = kind(governor.backpressure, governor.limits, self, transport)
        # Why reading is paused, as bits (BACKPRESSURE, RATE_LIMIT); 0 = reading.
        self.reading_paused = 0
        limits = governor.limits
        self.bucket = (
            TokenBucket(limits.max_messages_per_second, governor.clock)
            if limits.max_messages_per_second > 0
            else None
        )
        self._host: str | None = None
        self._idle: IDelayedCall | None = None
        self._resume: IDelayedCall | None = None
        self._started = False

    def admit(self, host: str, listener: str) -> bool:
        """Apply the connection caps; False means close the connection now."""
        if not self.governor.gate.admit(host, listener):
            return False
        self._host = host
        return True

    def adopt(self, host: str) -> None:
        """Take over a connection already counted against the caps (a WebSocket upgrade)."""
        self._host = host

    def start(self) -> None:
        self._started = True
        self.transport.registerProducer(self.backlog, self.backlog.streaming)
        self.governor.backpressure.register(self)
        if self.governor.limits.idle_timeout > 0:
            self._idle = self.governor.clock.callLater(
                self.governor.limits.idle_timeout, self._idle_expired
            )

    def received(self, messages: int) -> None:
        """The peer sent ``messages`` messages (0 for other traffic): idle and rate accounting."""
        if self._idle is not None:
            self._idle.reset(self.governor.limits.idle_timeout)
        if self.bucket is not None and messages:
            deficit = self.bucket.take(messages)
            if deficit and self._resume is None:
                self.pause_reading(RATE_LIMIT)
                self.governor.metrics.throttled += 1
                self._resume = self.governor.clock.callLater(
                    deficit / self.bucket.rate, self._unthrottle
                )

    def slow(self) -> None:
        """BacklogOwner: the peer is over its backlog limit; log, count, close it."""
        self.log.warn(
            "{peer} is not reading: over {limit} bytes pending; disconnecting",
            peer=self.owner.origin.peer_id,
            limit=self.governor.limits.max_pending_bytes,
        )
        self.governor.metrics.disconnect("slow_consumer")
        self.owner.slow_consumer()

    def log_drop(self, started: bool, count: int) -> None:
        """BacklogOwner: a drop episode started or ended."""
        if started:
            self.log.warn(
                "{peer} is not reading: over {limit} bytes pending; dropping its messages "
                "until it catches up",
                peer=self.owner.origin.peer_id,
                limit=self.governor.limits.max_pending_bytes,
            )
        else:
            self.log.info(
                "{peer} caught up; {count} messages were dropped for it",
                peer=self.owner.origin.peer_id,
                count=count,
            )

    def count(self, wire: Any) -> int:
        """BacklogOwner: messages in ``wire``, as the peer's framer tells."""
        return self.owner.framer.count(wire)

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
        self.governor.metrics.disconnect("idle_timeout")
        self.owner.idle_timeout()

    def stop(self) -> None:
        """The connection is gone: release everything it held."""
        for call in (self._idle, self._resume):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._resume = None
        self.backlog.release()
        if self._started:
            self.governor.backpressure.unregister(self)
        if self._host is not None:
            self.governor.gate.release(self._host)
            self._host = None
