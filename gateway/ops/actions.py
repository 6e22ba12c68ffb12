"""What the admin API reads and does beyond health and metrics: ``/stats``, ``/channels``,
closing a peer and publishing as the operator.

Everything is worked out when asked, from the bus's own counters and tables.
"""

from __future__ import annotations

import base64
import binascii
import heapq
from collections import Counter
from typing import Any

from zope.interface import implementer

from gateway.core.bus import Bus
from gateway.core.channels import has_wildcard, is_name
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin

OPERATOR = Origin("admin", "admin", "admin")
"""Who the operator's messages are from: peer id, listener and transport ``admin``."""


def stats(bus: Bus, uptime: float, version: str) -> dict[str, Any]:
    """The gateway's numbers now: what the admin page charts (as rates between two reads)."""
    metrics = bus.metrics
    connections = Counter(peer.origin.transport for peer in bus.attached())
    return {
        "version": version,
        "uptime_seconds": round(uptime, 3),
        "peers": bus.peer_count,
        "connections": dict(sorted(connections.items())),
        "channels": bus.routes.keys,
        "subscriptions": bus.subscription_count(),
        "messages_received": sum(metrics.messages_received.values()),
        "bytes_received": sum(metrics.bytes_received.values()),
        "messages_delivered": metrics.messages_delivered,
        "bytes_delivered": sum(bus.delivered_totals()[1].values()),
        "dropped": dict(sorted(metrics.dropped.items())),
        "disconnects": dict(sorted(metrics.disconnects.items())),
    }


def channels(bus: Bus, limit: int) -> dict[str, Any]:
    """The names and patterns with subscribers, the most subscribed first (``limit`` of them)."""
    routes = bus.routes
    counts = [
        (sum(len(group.members) for group in groups.values()), key)
        for table in (routes.exact, routes.wildcard)
        for key, groups in table.items()
    ]
    top = heapq.nsmallest(limit, counts, key=lambda item: (-item[0], item[1]))
    listed = [{"channel": key, "subscribers": count} for count, key in top]
    return {"total": len(counts), "limit": limit, "channels": listed}


SEARCHED = ("id", "transport", "listener", "channel", "user", "tls_subject", "address")
"""What ``GET /peers?q=`` looks in, for the text it is given (any case)."""


def matching_peers(bus: Bus, text: str) -> list[dict[str, object]]:
    """What ``/peers`` shows of every attached peer with ``text`` in one of ``SEARCHED``
    (any case), in the order they joined."""
    needle = text.lower()
    found = []
    for peer in bus.attached():
        info = bus.peer_info(peer)
        if info is not None and any(needle in str(info[key] or "").lower() for key in SEARCHED):
            found.append(info)
    return found


def find_peer(bus: Bus, peer_id: str) -> IPeer | None:
    """The attached peer with id ``peer_id``, if any."""
    for peer in bus.attached():
        if peer.origin.peer_id == peer_id:
            return peer
    return None


class PublishError(ValueError):
    """A ``POST /publish`` body that cannot be published; ``str()`` says why."""


def publish(bus: Bus, body: Any, max_message_bytes: int) -> tuple[str, int]:
    """Publish ``{"channel": ..., "text" | "base64": ...}`` as the operator; returns the
    channel and how many local peers it reached."""
    if not isinstance(body, dict):
        raise PublishError('expected a JSON object {"channel": ..., "text": ...}')
    channel = body.get("channel")
    if not isinstance(channel, str) or not is_name(channel) or has_wildcard(channel):
        raise PublishError('"channel" must be a channel name (no wildcards)')
    if isinstance(body.get("text"), str):
        payload, kind = body["text"].encode("utf-8"), Kind.TEXT
    elif isinstance(body.get("base64"), str):
        try:
            payload, kind = base64.b64decode(body["base64"], validate=True), Kind.BINARY
        except binascii.Error:
            raise PublishError('"base64" is not base64') from None
    else:
        raise PublishError('give "text" (a string) or "base64"')
    if not payload:
        raise PublishError("an empty message is not a message")
    if len(payload) > max_message_bytes:
        raise PublishError(f"the message is over max_message_bytes ({max_message_bytes})")
    reached = bus.publish(_Operator(), Batch(OPERATOR, channel, [payload], (kind,)))
    return channel, reached


@implementer(IPeer)
class _Operator:
    """The sender of the operator's messages: may publish anywhere, skips nobody."""

    origin = OPERATOR
    channel = "main"
    framer: IFramer | None = None
    echo = True  # nobody is the sender: every subscriber gets it
    address = "admin"
    subject = None
    pending_bytes = 0
    dropped_messages = 0
    permissions = None

    def deliver(self, wire: Any) -> None:
        """Never called: the operator subscribes to nothing."""

    def forbidden(self, action: str, channel: str) -> None:
        """Never called: the operator may publish anywhere."""

    def close(self, reason: str) -> None:
        """Nothing to close."""
