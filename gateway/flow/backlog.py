"""Per-receiver backlog: what may wait for one receiver beyond its transport's buffer.

``Backlog`` is the push producer of a receiver's transport and applies the
slow-consumer policy; ``WriteThrough`` also writes straight to an idle socket.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPullProducer, IPushProducer
from zope.interface import implementer

from gateway.config.settings import Limits
from gateway.flow.backpressure import Backpressure


class BacklogOwner(Protocol):
    """Who a backlog reports to."""

    def slow(self) -> None:
        """The receiver fell more than the limit behind (policy "disconnect")."""

    def log_drop(self, started: bool, count: int) -> None:
        """Dropping for the receiver started, or ended after ``count`` messages."""

    def count(self, wire: Any) -> int:
        """How many messages ``wire`` (as the receiver's framer made it) holds."""


TRANSPORT_BUFFER = 64 * 1024
"""What a Twisted transport buffers before it pauses its producer."""


def lift_send_limit(transport: Any, limit: int) -> None:
    """Let Twisted send up to ``limit`` bytes a reactor turn to the socket under ``transport``.

    Twisted reads at most 64 KiB a turn from a sender but sends at most
    ``FileDescriptor.SEND_LIMIT`` (128 KiB) a turn to a receiver. A receiver
    whose wire form of a batch is over twice the size of what was read (JSON
    envelopes of short lines) would then fall behind a flooding sender by the
    difference every turn, and be cut as a slow consumer while it reads all
    it is sent at once. Found through ``.transport`` (TLS, WebSocket layers);
    nothing to do for a transport without a socket of its own (tests).
    """
    while transport is not None:
        if isinstance(transport, FileDescriptor):
            transport.SEND_LIMIT = max(FileDescriptor.SEND_LIMIT, limit)
            return
        transport = getattr(transport, "transport", None)


@implementer(IPushProducer)
class Backlog:
    """What waits for one receiver beyond its transport's own buffer.

    Registered as the push producer of the receiver's transport: Twisted calls
    ``pauseProducing`` once the transport buffers 64 KiB and ``resumeProducing``
    when it has drained. While paused, ``admit`` lets at most ``limit`` more
    bytes through; past that the ``policy`` decides: "disconnect" calls
    ``on_overflow`` once, "drop" discards (and counts) until the receiver drains.
    The ``owner`` tells how many messages some output holds (asked only on
    drops), and hears about overflows (``slow()``) and drop episodes
    (``log_drop(started, count)``).
    """

    streaming = True

    __slots__ = (
        "backpressure",
        "dropped",
        "dropped_total",
        "dropping",
        "limit",
        "owner",
        "paused",
        "pending",
        "policy",
        "transport",
    )

    def __init__(
        self,
        backpressure: Backpressure,
        limits: Limits,
        owner: BacklogOwner,
        transport: Any,
    ) -> None:
        self.transport = transport
        self.backpressure = backpressure
        self.limit = limits.max_pending_bytes
        # All that may wait for the receiver can go out in one turn.
        lift_send_limit(transport, self.limit + TRANSPORT_BUFFER)
        self.policy = limits.slow_consumer
        self.owner = owner
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
            self.backpressure.add(size)
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
        messages = self.owner.count(wire)
        self.dropped += messages
        self.dropped_total += messages
        self.backpressure.metrics.drop("slow_consumer", messages)

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
            self.backpressure.remove(self.pending)
            self.pending = 0

    def hold(self, size: int, lasting: bool = False) -> None:
        """Something other than the backlog wrote ``size`` bytes to the transport.

        Nothing to do here: everything goes through the transport anyway.
        ``WriteThrough`` stops writing past it (see there).
        """


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
    that nobody else writes to behind our back (plain TCP peers), or whose other
    writers say so first with ``hold`` (Autobahn's handshake, pings, pongs and
    close frames on a plain ``ws`` peer).
    """

    streaming = False

    __slots__ = ("idle", "queued", "registered", "shared", "socket")

    def __init__(
        self,
        backpressure: Backpressure,
        limits: Limits,
        owner: BacklogOwner,
        transport: Any,
    ) -> None:
        super().__init__(backpressure, limits, owner, transport)
        self.socket = transport.getHandle()  # not its bound send: 72 bytes a peer
        self.idle = True
        self.queued = 0
        # Twisted's own transports ask a pull producer for data as they register it,
        # whatever they hold: that call does not mean the buffer drained.
        self.registered = not isinstance(transport, FileDescriptor)
        self.shared = False  # True: others write to the transport unannounced; never write past it

    def write(self, wire: bytes) -> None:
        """Send ``wire`` now if nothing is queued, else queue it (within the limits)."""
        if self.idle:
            try:
                sent = self.socket.send(wire)
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

    def hold(self, size: int, lasting: bool = False) -> None:
        """Something else wrote ``size`` bytes to the transport: until Twisted says its
        buffer drained, what follows goes through it too, after them (``lasting``: that
        writer may write later unannounced, so write through no more)."""
        self.idle = False
        self.queued += size
        if self.queued > TRANSPORT_BUFFER:
            self.paused = True
        if lasting:
            self.shared = True

    def resumeProducing(self) -> None:
        """Twisted: the transport's buffer is empty (or: it registered the backlog)."""
        if not self.registered:
            self.registered = True
            if self.queued:
                return  # held before registering: what was written has not drained yet
        self.idle = not self.shared
        self.queued = 0
        super().resumeProducing()
