"""What the bus remembers about each attached peer, and its counts worked out when asked.

Delivery counts nothing per receiver: a peer's "out" counts are the counts of
the groups it is subscribed through, minus what they were when it subscribed,
minus what was skipped (its own messages, overlapping subscriptions) and
dropped for it.
"""

from __future__ import annotations

from gateway.core.interfaces import IPeer
from gateway.core.routing import Group


class Entry:
    """One attached peer: when it came, what it sent, and its subscriptions.

    The first subscription lives in slots (most peers have only one); the
    others in ``more``, made when needed.
    """

    __slots__ = (
        "bytes_in",
        "first",
        "first_bytes",
        "first_messages",
        "messages_in",
        "more",
        "retired_bytes",
        "retired_messages",
        "since",
        "skipped_bytes",
        "skipped_messages",
    )

    def __init__(self, since: float) -> None:
        self.since = since
        self.messages_in = 0
        self.bytes_in = 0
        self.skipped_messages = 0
        self.skipped_bytes = 0
        self.retired_messages = 0
        self.retired_bytes = 0
        self.first: Group | None = None
        self.first_messages = 0
        self.first_bytes = 0
        self.more: dict[str, tuple[Group, int, int]] | None = None

    def subscriptions(self) -> list[str]:
        keys = [self.first.key] if self.first is not None else []
        return keys + list(self.more or ())

    def count(self) -> int:
        return (self.first is not None) + len(self.more or ())

    def has(self, key: str) -> bool:
        return (self.first is not None and self.first.key == key) or key in (self.more or ())

    def add(self, group: Group) -> None:
        if self.first is None:
            self.first, self.first_messages, self.first_bytes = group, group.messages, group.bytes
        else:
            if self.more is None:
                self.more = {}
            self.more[group.key] = (group, group.messages, group.bytes)

    def remove(self, group: Group) -> None:
        """Forget a subscription, keeping what it delivered."""
        if self.first is group:
            messages, size = group.messages - self.first_messages, group.bytes - self.first_bytes
            self.first = None
            if self.more:
                key = next(iter(self.more))
                self.first, self.first_messages, self.first_bytes = self.more.pop(key)
        elif self.more is not None and group.key in self.more:
            _, base_messages, base_bytes = self.more.pop(group.key)
            messages, size = group.messages - base_messages, group.bytes - base_bytes
        else:
            return
        self.retired_messages += messages
        self.retired_bytes += size

    def out(self, peer: IPeer) -> tuple[int, int]:
        """Messages and payload bytes handed to ``peer`` since it joined."""
        messages = self.retired_messages - self.skipped_messages - peer.dropped_messages
        size = self.retired_bytes - self.skipped_bytes
        if self.first is not None:
            messages += self.first.messages - self.first_messages
            size += self.first.bytes - self.first_bytes
        for group, base_messages, base_bytes in (self.more or {}).values():
            messages += group.messages - base_messages
            size += group.bytes - base_bytes
        return messages, size

    def info(self, peer: IPeer) -> dict[str, object]:
        """What ``/peers`` shows about ``peer`` (this is its entry)."""
        messages_out, bytes_out = self.out(peer)
        origin = peer.origin
        return {
            "id": origin.peer_id,
            "listener": origin.listener,
            "transport": origin.transport,
            "channel": peer.channel,
            "subscriptions": self.subscriptions(),
            "address": peer.address,
            "connected_since": self.since,
            "messages_in": self.messages_in,
            "bytes_in": self.bytes_in,
            "messages_out": messages_out,
            "bytes_out": bytes_out,
            "pending_bytes": peer.pending_bytes,
            "tls_subject": peer.subject,
            "user": origin.user,
        }
