"""Gateway-wide backpressure: the total of bytes waiting for slow receivers; over its limit every stream sender stops being read until it drains."""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

from gateway.config.settings import Limits
from gateway.core.metrics import Metrics

BACKPRESSURE = 1
RATE_LIMIT = 2
SIGN_IN = 4  # a sign-in is being checked: nothing after it is read until the verdict


class Reader(Protocol):
    """A sender whose reading backpressure may pause (a ``ConnectionFlow``)."""

    def pause_reading(self, reason: int) -> None: ...

    def resume_reading(self, reason: int) -> None: ...


class Backpressure:
    """Gateway-wide accounting of bytes waiting for slow receivers."""

    log = Logger()

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limit = limits.max_total_pending_bytes
        self.metrics = metrics
        self.total_pending = 0
        self.readers: set[Reader] = set()
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

    def register(self, reader: Reader) -> None:
        self.readers.add(reader)
        if self.backpressure:
            reader.pause_reading(BACKPRESSURE)

    def unregister(self, reader: Reader) -> None:
        self.readers.discard(reader)
