"""Log output: one line per event, with time and level."""

from __future__ import annotations

from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsText,
    formatTime,
)
from zope.interface import implementer


@implementer(ILogObserver)
class TextLogObserver:
    """``2026-11-28T23:40:12+0000 [info] message``, flushed line by line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        when = formatTime(event.get("log_time"), timeFormat="%Y-%m-%dT%H:%M:%S%z")
        self.stream.write(f"{when} [{level.name}] {text}\n")
        self.stream.flush()


_NO: PredicateResult = PredicateResult.no
_MAYBE: PredicateResult = PredicateResult.maybe


@implementer(ILogFilterPredicate)
class QuietTwistedChatter:
    """Hide Twisted's legacy informational lines ("Port 8006 Closed") unless debugging."""

    def __init__(self, level: LogLevel) -> None:
        self.level = level

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if (
            self.level > LogLevel.debug
            and event.get("log_namespace") == "log_legacy"
            and not event.get("isError")
        ):
            return _NO
        return _MAYBE


def observer(stream: TextIO, level: LogLevel = LogLevel.info) -> ILogObserver:
    """The gateway's log observer: events at ``level`` and above go to ``stream``."""
    return FilteringLogObserver(
        TextLogObserver(stream),
        [QuietTwistedChatter(level), LogLevelFilterPredicate(defaultLogLevel=level)],
    )
