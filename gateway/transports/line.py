"""Line-oriented stream peers (the ``tcp`` listener; ``tls`` is the same under TLS).

Wire rules: ``\\n`` ends a message, one trailing ``\\r`` is removed, empty
lines are ignored, payloads are any bytes. Outbound messages are written
followed by ``\\n``. All complete lines of one read go to the bus as one batch.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config.listeners import TcpListenerConfig
from gateway.config.settings import Limits
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind
from gateway.tls.server import peer_subject
from gateway.transports.envelopes import (
    event,
    message_envelopes,
    plain_message_runs,
    verbatim_envelopes,
)
from gateway.transports.lifecycle import StreamPeer
from gateway.transports.listening import ListenerService
from gateway.transports.runtime import GatewayContext, ListenerRuntime


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
            return b"".join(envelope + b"\n" for envelope in message_envelopes(batch))
        head, tail = verbatim  # the whole batch in one join
        tail += b"\n"
        return head + (tail + head).join(batch.payloads) + tail

    def count(self, wire: bytes) -> int:
        return wire.count(b"\n")

    def event(self, fields: dict[str, Any]) -> bytes:
        return event(fields) + b"\n"


JSON_LINE_FRAMER = JsonLineFramer()


@implementer(IPeer, IHandshakeListener)
class LineProtocol(StreamPeer, Protocol):
    """One stream peer: splits its bytes into lines and relays them as batches."""

    framer = LINE_FRAMER
    _first_line = b""  # while signing in: the first line, kept in case it is no sign-in

    def __init__(self, factory: LineFactory) -> None:
        runtime = factory.runtime
        self._init_peer(runtime, runtime.config.type)
        config = runtime.config
        assert isinstance(config, TcpListenerConfig)
        self.max_message_bytes = runtime.limits.max_message_bytes
        self.quit_command = config.quit_command.encode("utf-8") if config.quit_command else None
        self._buffer = b""
        self._json = config.format == "json"
        # The channel and binary-ness of the run of JSON messages being gathered.
        self._run_channel = self.channel
        self._run_binary = False
        if self._json:
            self._speak_json(JSON_LINE_FRAMER)

    # Connection lifecycle

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
            transport.setTcpKeepAlive(True)
        # Plain TCP: only this protocol writes to the socket, so writing
        # straight to it while nothing is queued is safe (not under TLS).
        write_through = self.transport_name == "tcp" and ISystemHandle.providedBy(transport)
        if not self._admit(write_through=write_through):
            return
        if self.transport_name == "tls":
            self._arm_deadline(self.runtime.limits.handshake_timeout)
        else:
            self._join()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done; now the peer joins."""
        if not self._closing:
            self._join(peer_subject(self.transport))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if reason.check(ConnectionDone):
            why = "closed by the peer"
        else:
            why = f"connection lost: {reason.getErrorMessage()}"
        self._gone(why)

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
            # Reading is paused: at most what was in flight arrives meanwhile.
            self._buffer = data
            if len(data) > 2 * (self.max_message_bytes + 1) + 65536:
                self._too_long(len(data))
            return
        end = data.find(b"\n")
        if end < 0:
            self._keep_partial(data)
            return
        if end > self.max_message_bytes + 1:
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
        if len(rest) > self.max_message_bytes + 1:
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

    def _too_long(self, size: int) -> None:
        limit = self.max_message_bytes
        self.peer_log.warn(
            "{peer} sent a line of at least {size} bytes (limit {limit}); closing",
            peer=self.origin.peer_id,
            size=size,
            limit=limit,
        )
        self._oversize()
        if self.origin.peer_id:
            self.deliver(b"gateway: message too long (limit %d bytes), closing\n" % limit)
        self.close(f"message too long: {size} bytes, limit {limit}")

    # Going

    def close(self, reason: str) -> None:
        if self._closing:
            return
        self._leave(reason)
        transport: Any = self.transport
        # A transport waits for its producer to go before it closes (TLS does).
        transport.unregisterProducer()
        transport.loseConnection()
        self._disarm_deadline()
        self._cut_later()

    def abort(self, reason: str) -> None:
        """Drop the connection now, discarding anything not yet sent."""
        self._leave(reason)
        transport: Any = self.transport
        transport.abortConnection()


class LineFactory(Factory):
    """Builds a ``LineProtocol`` per connection of one ``tcp``/``tls`` listener."""

    noisy = False

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime

    def buildProtocol(self, addr: Any) -> LineProtocol:
        return LineProtocol(self)


class LineListener(ListenerService):
    """A ``tcp`` or ``tls`` listener."""

    def protocol_factory(self) -> LineFactory:
        return LineFactory(self.runtime)


def build(config: TcpListenerConfig, limits: Limits, context: GatewayContext) -> LineListener:
    return LineListener(ListenerRuntime(config, limits, context))
