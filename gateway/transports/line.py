"""Line-oriented stream peers (``framing = "lines"``, the default of ``tcp``/``tls``).

Wire rules: ``\\n`` ends a message, one trailing ``\\r`` is removed, empty
lines are ignored, payloads are any bytes. Outbound messages are written
followed by ``\\n``. All complete lines of one read go to the bus as one batch.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from gateway.core.interfaces import IFramer
from gateway.core.message import Batch, Kind
from gateway.transports.envelopes import (
    event,
    message_envelopes,
    plain_message_runs,
    verbatim_envelopes,
)
from gateway.transports.runtime import ListenerRuntime
from gateway.transports.stream import StreamProtocol


@implementer(IFramer)
class LineFramer:
    """Each payload followed by ``\\n``, all of a batch in one bytes object."""

    name = "line"

    def frame(self, batch: Batch) -> bytes:
        if batch.lines is not None:
            return batch.lines
        return b"\n".join(batch.payloads) + b"\n"

    def count(self, wire: bytes) -> int:
        return wire.count(b"\n")


LINE_FRAMER = LineFramer()


@implementer(IFramer)
class JsonLineFramer:
    """Each message as a JSON envelope on a line of its own (``format = "json"``)."""

    name = "line-json"

    def frame(self, batch: Batch) -> bytes:
        verbatim = verbatim_envelopes(batch)
        if verbatim is None:
            return b"\n".join(message_envelopes(batch)) + b"\n"
        head, tail = verbatim  # the whole batch in one join
        tail += b"\n"
        return head + (tail + head).join(batch.payloads) + tail

    def count(self, wire: bytes) -> int:
        return wire.count(b"\n")

    def event(self, fields: dict[str, Any]) -> bytes:
        return event(fields) + b"\n"


JSON_LINE_FRAMER = JsonLineFramer()


class LineProtocol(StreamProtocol):
    """One stream peer: splits its bytes into lines and relays them as batches."""

    framer = LINE_FRAMER
    message_slack = 1  # the '\r' of a '\r\n' ending
    _first_line = b""  # while signing in: the first line, kept in case it is no sign-in

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__(runtime)
        config = self.config
        self.quit_command = config.quit_command.encode("utf-8") if config.quit_command else None
        self._json = config.format == "json"
        # The channel and binary-ness of the run of JSON messages being gathered.
        self._run_channel = self.channel
        self._run_binary = False
        if self._json:
            self._speak_json(JSON_LINE_FRAMER)

    # Inbound

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._buffer:
            data = self._buffer + data
        if self._signin is not None:
            self._sign_in_line(data)
            return
        end = data.rfind(b"\n")
        flow = self.flow
        assert flow is not None
        if end < 0:
            flow.received(0)
            self._keep_partial(data)
            return
        rest = data[end + 1 :]
        chunk = data[: end + 1]
        lines = chunk.split(b"\n")
        lines.pop()  # the empty piece after the last newline
        flow.received(len(lines))
        if (
            not self._json
            and max(map(len, lines)) <= self.max_message_bytes
            and chunk.find(b"\r") < 0
            and b"" not in lines
            and (self.quit_command is None or self.quit_command not in lines)
        ):
            # The common case: every line is already a payload, and the bytes
            # read are already the line framing of the batch.
            self._publish(lines, chunk)
        elif not (self._json and self._publish_plain(chunk, lines)) and not (
            self._publish_checked(lines)
        ):
            return
        self._keep_partial(rest)

    def _sign_in_line(self, data: bytes) -> None:
        """Until signed in: the first line is the sign-in; what follows waits, unread."""
        assert self._signin is not None
        if self._signin.checking:
            self._hold(data)
            return
        end = data.find(b"\n")
        if end < 0:
            self._keep_partial(data)
            return
        if end > self.max_message_bytes + self.message_slack:
            self._too_long(end)
            return
        self._buffer = data[end + 1 :]
        first = data[:end]
        self._first_line = first
        self._sign_in(first[:-1] if first.endswith(b"\r") else first)

    def _resume_input(self, first_is_ordinary: bool) -> None:
        """Signed in: handle the lines that waited (the first one too, when it was no
        sign-in), as if they had just arrived."""
        if first_is_ordinary:
            self._buffer = self._first_line + b"\n" + self._buffer
        self._first_line = b""
        if self._buffer:
            self.dataReceived(b"")

    def _publish_plain(self, chunk: bytes, lines: list[bytes]) -> bool:
        """A JSON client's read of nothing but plain message requests (the common case):
        published run by run; False (and nothing done) for any other read."""
        if max(map(len, lines)) > self.max_message_bytes or (
            self.quit_command is not None and self.quit_command in lines
        ):
            return False
        runs = plain_message_runs(chunk, len(lines))
        if runs is None:
            return False
        for channel, payloads in runs:
            self.bus.publish(self, Batch(self.origin, channel, payloads))
        return True

    def _publish_checked(self, lines: list[bytes]) -> bool:
        """Publish lines one by one; False once the connection is being closed."""
        payloads: list[bytes] = []
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                continue
            if len(line) > self.max_message_bytes:
                self._publish(payloads, None)
                self._too_long(len(line))
                return False
            if line == self.quit_command:
                self._publish(payloads, None)
                self.close("quit command")
                return False
            if self._json:
                payloads = self._request_line(line, payloads)
            else:
                payloads.append(line)
        self._publish(payloads, None)
        return True

    def _request_line(self, line: bytes, payloads: list[bytes]) -> list[bytes]:
        """A JSON client's line: answered, or added to the run of what to publish."""
        request = self._request(line)
        if request is None:
            return payloads
        channel, payload, kind = request
        if channel != self._run_channel or kind is Kind.BINARY or self._run_binary:
            self._publish(payloads, None)
            payloads = []
            self._run_channel = channel
        self._run_binary = kind is Kind.BINARY
        payloads.append(payload)
        return payloads

    def _keep_partial(self, rest: bytes) -> None:
        # One byte over the limit is allowed for the '\r' of a '\r\n' ending.
        if len(rest) > self.max_message_bytes + self.message_slack:
            self._buffer = b""
            self._too_long(len(rest))
        else:
            self._buffer = rest

    def _publish(self, payloads: list[bytes], lines: bytes | None) -> None:
        if not payloads:
            return
        if not self._json:
            self.bus.publish(self, Batch(self.origin, self.channel, payloads, None, lines))
            return
        # A run of one JSON client's messages to one channel (binary ones alone).
        kinds = (Kind.BINARY,) if self._run_binary else None
        self.bus.publish(self, Batch(self.origin, self._run_channel, payloads, kinds))
