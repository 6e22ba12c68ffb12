"""Log output in memory: lines of one reactor turn written together, warnings at once, and
messages formatted as Twisted formats them."""

from __future__ import annotations

import io
import json
import threading

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogPublisher, eventAsText
from twisted.python.failure import Failure

from gateway.ops.logs import HOLD_BYTES, message, observer


class CountingStream(io.StringIO):
    """A text stream that counts its writes (each would be a syscall on a real file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def logger_to(stream: io.StringIO, reactor: MemoryReactorClock, **settings: str) -> Logger:
    publisher = LogPublisher(observer(stream, reactor=reactor, **settings))
    return Logger(namespace="test", observer=publisher)


def running() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.running = True
    return reactor


def test_lines_of_one_turn_are_written_together_when_it_ends():
    reactor, stream = running(), CountingStream()
    log = logger_to(stream, reactor)
    for number in range(1000):
        log.info("peer {number} connected", number=number)
    assert stream.getvalue() == ""
    reactor.advance(0)
    lines = stream.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        f"peer {n} connected" for n in range(1000)
    ]
    assert all(" [info] " in line for line in lines)
    assert stream.writes == 1


def test_a_warning_is_written_at_once_after_what_was_held():
    reactor, stream = running(), CountingStream()
    log = logger_to(stream, reactor)
    log.info("first")
    log.warn("careful")
    assert [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()] == [
        "first",
        "careful",
    ]
    log.error("bad")
    assert stream.getvalue().splitlines()[-1].endswith("[error] bad")
    reactor.advance(0)  # nothing left to write
    assert len(stream.getvalue().splitlines()) == 3


def test_held_text_is_bounded():
    reactor, stream = running(), CountingStream()
    log = logger_to(stream, reactor)
    line = "x" * 1000
    for _ in range(HOLD_BYTES // 1000 + 1):
        log.info(line)
    assert stream.writes == 1 and len(stream.getvalue()) >= HOLD_BYTES


def test_before_the_reactor_runs_and_from_other_threads_lines_are_written_at_once():
    reactor, stream = MemoryReactorClock(), CountingStream()
    log = logger_to(stream, reactor)
    log.info("starting")
    assert stream.getvalue().endswith("[info] starting\n")
    reactor.running = True
    thread = threading.Thread(target=lambda: log.info("from a thread"))
    thread.start()
    thread.join()
    assert stream.getvalue().endswith("[info] from a thread\n")


def test_shutdown_writes_what_is_held():
    reactor, stream = running(), CountingStream()
    log = logger_to(stream, reactor)
    log.info("stopped")
    for flush, args, kwargs in reactor.triggers["after"]["shutdown"]:
        flush(*args, **kwargs)
    assert stream.getvalue().endswith("[info] stopped\n")


def test_json_lines_are_held_the_same_way():
    reactor, stream = running(), CountingStream()
    log = logger_to(stream, reactor, log_format="json")
    log.info("peer {name} connected", name="tcp-1")
    log.info("peer {name} left", name="tcp-1")
    reactor.advance(0)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["message"] for r in records] == ["peer tcp-1 connected", "peer tcp-1 left"]
    assert stream.writes == 1


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def upper(self) -> str:
        return self.name.upper()


def failure_event() -> dict[str, object]:
    try:
        raise ValueError("boom")
    except ValueError:
        return {"log_format": "failed: {what}", "what": "x", "log_failure": Failure()}


@pytest.mark.parametrize(
    "event",
    [
        {
            "log_format": "{peer} connected from {address} ({count} peers)",
            "peer": "tcp-1",
            "address": "127.0.0.1:5",
            "count": 3,
        },
        {
            "log_format": "reason {reason!r}, {size:,} bytes, {{braces}}",
            "reason": "a'b",
            "size": 123456,
        },
        {"log_format": "attribute {thing.name}", "thing": Named("n")},
        {"log_format": "called {thing.upper()}", "thing": Named("n")},
        {"log_format": "missing {nothing}"},
        {"log_format": "bad {"},
        {"log_text": "legacy text"},
        {"log_format": b"bytes {x}", "x": 1},
        failure_event(),
    ],
)
def test_messages_read_as_twisted_formats_them(event):
    expected = eventAsText(event, includeTimestamp=False, includeSystem=False)
    got = message(event)
    if "Unable to format" in expected:
        assert "Unable to format" in got
    else:
        assert got == expected
