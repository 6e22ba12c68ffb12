"""Log output: one line per event, as text or as JSON, filtered by level."""

from __future__ import annotations

import json
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


@implementer(ILogObserver)
class JsonLogObserver:
    """One JSON object per line: time, level, namespace, the message, and its fields."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "time": formatTime(event.get("log_time"), timeFormat="%Y-%m-%dT%H:%M:%S.%f%z"),
            "level": level.name,
            "namespace": event.get("log_namespace", ""),
            "message": eventAsText(event, includeTimestamp=False, includeSystem=False),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and _plain(value):
                record[key] = value
        self.stream.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.stream.flush()


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def observer(stream: TextIO, level: str = "info", log_format: str = "text") -> ILogObserver:
    """The gateway's log observer: events at ``level`` and above go to ``stream``."""
    threshold = LEVELS[level]
    output = JsonLogObserver(stream) if log_format == "json" else TextLogObserver(stream)
    return FilteringLogObserver(
        output,
        [QuietTwistedChatter(threshold), LogLevelFilterPredicate(defaultLogLevel=threshold)],
    )
