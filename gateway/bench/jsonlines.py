"""JSON-lines subscribers: clients of a gateway listener with ``format = "json"``.

Such a client chooses its channel with a ``subscribe`` request and receives
one JSON object a line: its messages, and events (``welcome``, ``join``,
``leave``, answers) that are not counted. A message's payload is the string
after ``"text":"`` (the bench's payloads are ASCII hex and dots, never a quote
or a backslash, so JSON leaves them as they are).

Lines have no fixed length over a run (the sender's peer id and the channel
are in each), but all messages of one sender on one channel have the same
length, which is what a subscriber of one channel receives in a flood. So a
subscriber learns the length (and the payload's place) from a message line
it parses, then counts chunks in bulk as the raw lines are counted: one strided
slice picks each line's kind byte, another each line's first byte (``{``).
Anything else (an event, a message of another length) goes through the line
parser, which learns the new length.
"""

from __future__ import annotations

import json
import select
from typing import TYPE_CHECKING

from gateway.bench.subscribers import StreamClient
from gateway.bench.wire import DATA, PROBE

if TYPE_CHECKING:
    from gateway.bench.loop import Loop
    from gateway.bench.subscribers import Tally
    from gateway.bench.target import Target

TEXT = b'"text":"'
TEXT_OFFSET = len(TEXT)
ERROR = b'{"type":"error"'
NEWLINE = ord("\n")
OPEN = ord("{")


def request(kind: str, channel: str) -> bytes:
    """One JSON request line (``subscribe``, ``unsubscribe``)."""
    return json.dumps({"type": kind, "channel": channel}, separators=(",", ":")).encode() + b"\n"


class JsonClient(StreamClient):
    """A subscriber that subscribes to one channel (or pattern) by a JSON request."""

    def __init__(
        self,
        loop: Loop,
        target: Target,
        tally: Tally,
        size: int,
        pattern: str,
        leave: str | None,
        source: str | None = None,
        channel: int = 0,
        channels: int = 1,
    ) -> None:
        super().__init__(loop, target, tally, size, "", source, channel, channels)
        self.pattern = pattern
        self.leave = leave
        self._answer = b'{"type":"subscribed","channel":' + json.dumps(pattern).encode()
        # The length of the last message line, and where its payload starts: lines of
        # one sender on one channel all have the same (its id and the channel are in each).
        self.length = 0
        self.offset = 0

    def connected(self) -> None:
        self.state = self.SETUP
        self.loop.modify(self, select.EPOLLIN)
        first = request("unsubscribe", self.leave) if self.leave else b""
        self.send(first + request("subscribe", self.pattern))

    def setup_readable(self) -> None:
        got = self.setup_bytes()
        if got is None:
            return
        data = self.rest + got
        pos = 0
        while self.state == self.SETUP:
            end = data.find(b"\n", pos)
            if end < 0:
                break
            line = data[pos:end]
            pos = end + 1
            if line.startswith(self._answer):
                self.ready()
            elif line.startswith(ERROR):
                self.fail("refused: " + line.decode("utf-8", "replace"))
                return
        self.rest = b""
        if self.state == self.READY:
            self.consume_bytes(data[pos:])
        else:
            self.rest = data[pos:]

    def _consume(self, buffer: bytearray, filled: int) -> int:
        base = 0
        while True:
            if self.length:
                used = self._bulk(buffer, base, filled)
                if used:
                    base += used
                    if base == filled:
                        return base
            if self.state == self.CLOSED:
                return filled
            used = self._lines(buffer, base, filled)
            if not used:
                if filled - base >= len(buffer) - 65536:
                    self.fail("a line longer than the read buffer")
                    return filled
                return base
            base += used

    def _bulk(self, buffer: bytearray, base: int, filled: int) -> int:
        """Count the whole lines from ``base`` in one go if all are messages of the learnt
        length; returns the bytes used (0: they are not, or there is no whole line)."""
        length = self.length
        whole = (filled - base) // length
        if not whole:
            return 0
        end = base + whole * length
        kinds = buffer[base + self.offset : end : length]
        data_count = kinds.count(DATA)
        probes = kinds.count(PROBE)
        if (
            data_count + probes != whole
            or buffer[end - 1] != NEWLINE
            or buffer[base:end:length].count(OPEN) != whole
        ):
            return 0
        if probes:
            self.synced = True
            self.tally.probes += probes
        if data_count:
            self.count += data_count
            self.tally.count += data_count
            loop = self.loop
            if loop.parse_all:
                self._check_all(buffer, base, end)
            elif loop.measuring:
                start = end - length + self.offset
                if buffer[start] == DATA:
                    sent = int(buffer[start + 17 : start + 33], 16)
                    self.tally.latencies.append(loop.now - sent)
        return end - base

    def _lines(self, buffer: bytearray, base: int, filled: int) -> int:
        """Take lines one by one up to the first that is not a message of the learnt length
        (it included: an event, or a message whose length is learnt now); returns bytes used."""
        pos = base
        loop = self.loop
        while True:
            end = buffer.find(b"\n", pos, filled)
            if end < 0:
                return pos - base
            line_end = end + 1
            text = buffer.find(TEXT, pos, line_end)
            kind = buffer[text + TEXT_OFFSET] if text >= 0 else -1
            if kind == DATA:
                self.count += 1
                self.tally.count += 1
                if loop.parse_all or loop.measuring:
                    sent = self._check(buffer, text + TEXT_OFFSET)
                    if loop.measuring:
                        self.tally.latencies.append(loop.now - sent)
            elif kind == PROBE:
                self.synced = True
                self.tally.probes += 1
            elif buffer.startswith(ERROR, pos):
                line = bytes(buffer[pos:end]).decode("utf-8", "replace")
                self.fail("gateway error event: " + line)
                return filled - base
            regular = kind in (DATA, PROBE) and line_end - pos == self.length
            if kind in (DATA, PROBE) and not regular:
                self.length = line_end - pos  # messages of another sender from now on
                self.offset = text + TEXT_OFFSET - pos
            pos = line_end
            if not regular:
                return pos - base

    def _check_all(self, buffer: bytearray, base: int, end: int) -> None:
        """Sequence-check (and, when measuring, time) every data message up to ``end``."""
        loop = self.loop
        latencies = self.tally.latencies
        measuring = loop.measuring
        for start in range(base + self.offset, end, self.length):
            if buffer[start] == DATA:
                sent = self._check(buffer, start)
                if measuring:
                    latencies.append(loop.now - sent)
