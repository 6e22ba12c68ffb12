"""Rate-limited warnings: at most one line per interval per cause, with a count of what was suppressed."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


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
