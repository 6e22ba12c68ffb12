"""Peers that live in application code: publish from Python, receive with a callback.

An ``AppPeer`` is a peer like any other (transport ``app``): what it publishes
reaches every other peer of its channel, framed for each of their transports,
and it receives their messages as ``Message`` values, without a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zope.interface import implementer

from gateway.core.bus import Bus
from gateway.core.channels import is_name
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin


@dataclass(frozen=True)
class Message:
    """One message an ``AppPeer`` received."""

    payload: bytes
    kind: Kind
    origin: Origin
    channel: str
    history: bool = False

    @property
    def text(self) -> str:
        """The payload as text (replacement characters for bytes that are not UTF-8)."""
        return self.payload.decode("utf-8", "replace")


@implementer(IFramer)
class _BatchFramer:
    """App peers get the batch itself: no bytes to make."""

    name = "app"

    def frame(self, batch: Batch) -> Batch:
        return batch

    def count(self, wire: Batch) -> int:
        return len(wire)


_BATCH_FRAMER = _BatchFramer()


@implementer(IPeer)
class AppPeer:
    """A peer on ``channel`` of ``bus``, named like ``app-1`` (``name-<n>``).

    ``on_message`` is called for every message of the channel from other
    peers (and its own with ``echo``); it runs inside the fan-out, so it must
    not block. The peer is attached at once; ``close`` detaches it.
    """

    framer = _BATCH_FRAMER
    subject = None
    pending_bytes = 0  # delivered synchronously: nothing ever waits
    dropped_messages = 0
    address = "in-process"
    permissions = None  # application code may do anything

    def forbidden(self, action: str, channel: str) -> None:
        """IPeer: never called (an application peer is refused nothing)."""

    def __init__(
        self,
        bus: Bus,
        on_message: Callable[[Message], object] | None = None,
        channel: str = "main",
        name: str = "app",
        echo: bool = False,
    ) -> None:
        self.bus = bus
        self.on_message = on_message
        self.channel = channel
        self.echo = echo
        self.origin = Origin(bus.new_peer_id(name), name, "app")
        self.closed: str | None = None
        bus.attach(self)

    def publish(self, *messages: bytes | str, channel: str | None = None) -> int:
        """Send ``messages`` (str is sent as UTF-8 text) as one batch to ``channel``
        (default: the peer's own); returns the receivers reached."""
        if self.closed is not None:
            raise RuntimeError(f"{self.origin.peer_id} is closed ({self.closed})")
        target = self.channel if channel is None else channel
        if not is_name(target):
            raise ValueError(f"not a channel name one can publish to: {target!r}")
        payloads = [m.encode("utf-8") if isinstance(m, str) else m for m in messages]
        kinds = [Kind.TEXT if isinstance(m, str) else Kind.of(m) for m in messages]
        return self.bus.publish(self, Batch(self.origin, target, payloads, kinds))

    def subscribe(self, pattern: str) -> bool:
        """Also receive the channels ``pattern`` names (``room.42``, ``room.*``,
        ``sensors.>``); False if already subscribed. Raises ``SubscriptionError``."""
        return self.bus.subscribe(self, pattern)

    def unsubscribe(self, pattern: str) -> None:
        """End a subscription. Raises ``SubscriptionError`` (``not_subscribed``)."""
        self.bus.unsubscribe(self, pattern)

    def deliver(self, wire: Batch) -> None:
        if self.on_message is None:
            return
        for payload, kind in wire.messages():
            self.on_message(Message(payload, kind, wire.origin, wire.channel, wire.history))

    def close(self, reason: str = "closed by the application") -> None:
        if self.closed is None:
            self.closed = reason
            self.bus.detach(self)
