"""Log output: one line per event, as text or as JSON, filtered by level."""

from __future__ import annotations

import json
import threading
from typing import Any, TextIO

from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
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

HOLD_BYTES = 64 * 1024
"""Most log text held for the end of a reactor turn; more is written at once."""


class LineOutput:
    """The observers' lines, written to ``stream`` together at the end of each reactor turn.

    A burst (a thousand connections accepted in one turn, two lines each) is one write
    instead of two thousand; a line waits at most for the turn to end. Warnings and errors,
    lines from other threads and lines while the reactor is not running are written at
    once (after those held, in order); the rest at shutdown.
    """

    def __init__(self, stream: TextIO, reactor: IReactorTime | None = None) -> None:
        self.stream = stream
        self.reactor = reactor
        self._lines: list[str] = []
        self._held = 0
        self._call: IDelayedCall | None = None
        self._thread = threading.get_ident()
        if reactor is not None and IReactorCore.providedBy(reactor):
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def write(self, line: str, urgent: bool = False) -> None:
        self._lines.append(line)
        self._held += len(line)
        reactor = self.reactor
        if (
            urgent
            or reactor is None
            or self._held >= HOLD_BYTES
            or not getattr(reactor, "running", False)
            or threading.get_ident() != self._thread
        ):
            self.flush()
        elif self._call is None:
            self._call = reactor.callLater(0, self.flush)

    def flush(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            self._held = 0
            self.stream.write(text)
            self.stream.flush()


def message(event: dict[str, Any]) -> str:
    """The event's text, as ``eventAsText`` makes it (without time and system).

    Most events are a format of plain ``{field}`` names with no failure attached: those
    are formatted by ``str.format_map`` straight from the event, a fraction of the cost of
    Twisted's general formatter (which also calls ``{method()}`` fields and appends a
    failure's traceback); everything else goes to it.
    """
    text = event.get("log_format")
    if isinstance(text, str) and "log_failure" not in event and "()" not in text:
        try:
            return text.format_map(event)
        except Exception:
            pass  # a missing field, a bad format: Twisted says so in its own words
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


@implementer(ILogObserver)
class TextLogObserver:
    """``2026-11-28T23:40:12+0000 [info] message``, one line per event."""

    def __init__(self, output: LineOutput) -> None:
        self.output = output
        self._second: int | None = None
        self._when = ""

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        text = message(event)
        stamp = event.get("log_time")
        second = int(stamp) if stamp is not None else None
        if second is None or second != self._second:
            # The same second is formatted once (each formatting looks up the time zone).
            self._second = second
            self._when = formatTime(stamp, timeFormat="%Y-%m-%dT%H:%M:%S%z")
        self.output.write(f"{self._when} [{level.name}] {text}\n", level >= LogLevel.warn)


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

    def __init__(self, output: LineOutput) -> None:
        self.output = output

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "time": formatTime(event.get("log_time"), timeFormat="%Y-%m-%dT%H:%M:%S.%f%z"),
            "level": level.name,
            "namespace": event.get("log_namespace", ""),
            "message": message(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and _plain(value):
                record[key] = value
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        self.output.write(line, level >= LogLevel.warn)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def observer(
    stream: TextIO,
    level: str = "info",
    log_format: str = "text",
    reactor: IReactorTime | None = None,
) -> ILogObserver:
    """The gateway's log observer: events at ``level`` and above go to ``stream`` (with a
    ``reactor``, written once per reactor turn: see ``LineOutput``)."""
    threshold = LEVELS[level]
    lines = LineOutput(stream, reactor)
    output = JsonLogObserver(lines) if log_format == "json" else TextLogObserver(lines)
    return FilteringLogObserver(
        output,
        [QuietTwistedChatter(threshold), LogLevelFilterPredicate(defaultLogLevel=threshold)],
    )
