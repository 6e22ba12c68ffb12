"""Counters the gateway keeps about itself.

Updated once per batch on the hot path, never once per receiver.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter


class Histogram:
    """Fixed buckets, cumulative on output (Prometheus style); one bisect per observation."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ending with +Inf."""
        result = []
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


# From 10 microseconds to 1 second: one fan-out of a batch to every receiver.
FAN_OUT_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0)


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
        # Out-counts of peers that have left, by (listener, transport); the bus adds
        # the attached peers' counts at scrape time, so delivery costs nothing here.
        self.retired_messages_out: Counter[tuple[str, str]] = Counter()
        self.retired_bytes_out: Counter[tuple[str, str]] = Counter()
        self.fan_out_seconds = Histogram(FAN_OUT_BUCKETS)
        # Times a stream sender's reading was paused for going over its message rate.
        self.throttled = 0
        self.tls_handshake_failures: Counter[str] = Counter()
        # Actions refused by a peer's permissions: "publish", "subscribe".
        self.denied: Counter[str] = Counter()
        # Sign-ins by (listener, method, result: ok, failed, timeout).
        self.sign_ins: Counter[tuple[str, str, str]] = Counter()

    def drop(self, reason: str, count: int = 1) -> None:
        """Count messages not delivered (or not accepted) for ``reason``."""
        self.dropped[reason] += count

    def disconnect(self, reason: str) -> None:
        """Count a peer the gateway disconnected for ``reason``."""
        self.disconnects[reason] += 1

    def auth(self, listener: str, method: str, result: str) -> None:
        """Count a sign-in's outcome."""
        self.sign_ins[listener, method, result] += 1

    def deny(self, action: str) -> None:
        """Count an action a peer's permissions refused."""
        self.denied[action] += 1

    def handshake_failed(self, listener: str) -> None:
        """Count a connection that went away before finishing its handshake."""
        self.tls_handshake_failures[listener] += 1
