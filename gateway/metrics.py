"""Counters the gateway keeps about itself.

Updated once per batch on the hot path, never once per receiver.
"""

from __future__ import annotations

from collections import Counter


class Metrics:
    """Plain in-process counters; the admin endpoint renders them."""

    def __init__(self) -> None:
        self.messages_received: Counter[tuple[str, str]] = Counter()
        self.bytes_received: Counter[tuple[str, str]] = Counter()
        self.messages_delivered = 0
        # Messages other nodes of a cluster relayed to this one.
        self.remote_messages_received = 0
        self.dropped: Counter[str] = Counter()
        self.disconnects: Counter[str] = Counter()
        # Times a stream sender's reading was paused for going over its message rate.
        self.throttled = 0
        self.tls_handshake_failures: Counter[str] = Counter()

    def drop(self, reason: str, count: int = 1) -> None:
        """Count messages not delivered (or not accepted) for ``reason``."""
        self.dropped[reason] += count

    def disconnect(self, reason: str) -> None:
        """Count a peer the gateway disconnected for ``reason``."""
        self.disconnects[reason] += 1

    def handshake_failed(self, listener: str) -> None:
        """Count a connection that went away before finishing its handshake."""
        self.tls_handshake_failures[listener] += 1
