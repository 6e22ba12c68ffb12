"""Line-oriented stream peers (the ``tcp`` listener; ``tls`` reuses it).

Wire rules: ``\\n`` ends a message, one trailing ``\\r`` is removed, empty
lines are ignored, payloads are any bytes. Outbound messages are written
followed by ``\\n``. All complete lines of one read go to the bus as one batch.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.address import describe
from gateway.bus import Bus
from gateway.config import Limits, StreamListenerConfig
from gateway.flow import Backlog, FlowContext, StreamFlow, count_lines
from gateway.interfaces import IFramer, IPeer
from gateway.message import Batch, Origin
from gateway.tls import peer_subject


@implementer(IFramer)
class LineFramer:
    """Each payload followed by ``\\n``, all of a batch in one bytes object."""

    name = "line"

    def frame(self, batch: Batch) -> bytes:
        if batch.lines is not None:
            return batch.lines
        return b"\n".join(batch.payloads) + b"\n"


LINE_FRAMER = LineFramer()


@implementer(IPeer, IHandshakeListener)
class LineProtocol(Protocol):
    """One stream peer: splits its bytes into lines and relays them as batches."""

    log = Logger()
    framer = LINE_FRAMER

    def __init__(self, factory: LineFactory) -> None:
        self.factory = factory
        self.bus = factory.bus
        listener = factory.listener
        self.listener = listener
        self.channel = listener.channel
        self.echo = listener.echo
        self.max_message_bytes = factory.limits.max_message_bytes
        self.quit_command = listener.quit_command.encode("utf-8") if listener.quit_command else None
        self.origin = Origin("", listener.name, factory.transport_name)
        self._buffer = b""
        self._closing = False
        self._close_reason: str | None = None
        self._deadline: IDelayedCall | None = None
        self.subject: str | None = None  # the TLS client certificate's subject, if any
        self.flow: StreamFlow | None = None
        self.backlog: Backlog | None = None

    @property
    def address(self) -> str:
        """The remote address, for logs (worked out when asked: idle peers stay small)."""
        return describe(self.transport.getPeer()) if self.transport is not None else ""

    # Connection lifecycle

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
            transport.setTcpKeepAlive(True)
        remote = transport.getPeer()
        self.flow = StreamFlow(
            self.factory.flow,
            transport,
            self,
            count_lines,
            # Plain TCP: only this protocol writes to the socket, so writing
            # straight to it while nothing is queued is safe (not under TLS).
            write_through=self.factory.transport_name == "tcp"
            and ISystemHandle.providedBy(transport),
        )
        if not self.flow.admit(getattr(remote, "host", self.address), self.listener.name):
            self._closing = True
            self._close_reason = "connection limit"
            transport.abortConnection()
            return
        self.factory.connections.add(self)
        timeout = self.factory.handshake_timeout
        if timeout is None:
            self._join(None)
        else:
            # A deadline from connect, not an idle timer: a client trickling
            # handshake bytes is closed all the same.
            self._deadline = self.factory.clock.callLater(timeout, self._handshake_expired)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done; now the peer joins."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if not self._closing:
            self._join(peer_subject(self.transport))

    def _join(self, subject: str | None) -> None:
        self.subject = subject
        peer_id = self.bus.new_peer_id(self.listener.name)
        if subject:
            peer_id = f"{peer_id}:{subject}"
        self.origin = Origin(peer_id, self.listener.name, self.factory.transport_name)
        assert self.flow is not None
        self.flow.start()
        self.backlog = self.flow.backlog
        count = self.bus.attach(self)
        self.log.info(
            '{peer} connected from {address} (listener "{listener}", {count} peers)',
            peer=peer_id,
            address=self.address,
            listener=self.listener.name,
            count=count,
        )
        welcome = self.listener.welcome
        if welcome:
            text = welcome.format(count=count, peer=peer_id, name=self.factory.gateway_name)
            self.deliver(text.encode("utf-8") + b"\n")
        self.bus.replay_history(self)

    def _handshake_expired(self) -> None:
        self._deadline = None
        self.bus.metrics.disconnect("handshake_timeout")
        self.abort(f"handshake not finished within {self.factory.handshake_timeout:g} s")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self.bus.detach(self)
        if self.flow is not None:
            self.flow.stop()
        if self._close_reason == "connection limit":
            return
        self.factory.connections.discard(self)
        if self._close_reason is not None:
            why = self._close_reason
        elif reason.check(ConnectionDone):
            why = "closed by the peer"
        else:
            why = f"connection lost: {reason.getErrorMessage()}"
        if self.origin.peer_id:
            self.log.info("{peer} disconnected ({reason})", peer=self.origin.peer_id, reason=why)
        else:
            self.bus.metrics.handshake_failed(self.listener.name)
            self.log.info(
                '{address} failed the handshake on listener "{listener}" ({reason})',
                address=self.address,
                listener=self.listener.name,
                reason=why,
            )

    # Inbound

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._buffer:
            data = self._buffer + data
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
            max(map(len, lines)) <= self.max_message_bytes
            and chunk.find(b"\r") < 0
            and b"" not in lines
            and (self.quit_command is None or self.quit_command not in lines)
        ):
            # The common case: every line is already a payload, and the bytes
            # read are already the line framing of the batch.
            self._publish(lines, chunk)
        elif not self._publish_checked(lines):
            return
        self._keep_partial(rest)

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
            payloads.append(line)
        self._publish(payloads, None)
        return True

    def _keep_partial(self, rest: bytes) -> None:
        # One byte over the limit is allowed for the '\r' of a '\r\n' ending.
        if len(rest) > self.max_message_bytes + 1:
            self._buffer = b""
            self._too_long(len(rest))
        else:
            self._buffer = rest

    def _publish(self, payloads: list[bytes], lines: bytes | None) -> None:
        if payloads:
            self.bus.publish(self, Batch(self.origin, self.channel, payloads, None, lines))

    def _too_long(self, size: int) -> None:
        limit = self.max_message_bytes
        self.log.warn(
            "{peer} sent a line of at least {size} bytes (limit {limit}); closing",
            peer=self.origin.peer_id,
            size=size,
            limit=limit,
        )
        self.bus.metrics.drop("oversize")
        self.bus.metrics.disconnect("oversize")
        if self.backlog is not None:
            self.deliver(b"gateway: message too long (limit %d bytes), closing\n" % limit)
        self.close(f"message too long: {size} bytes, limit {limit}")

    # Outbound (IPeer)

    def deliver(self, wire: bytes) -> None:
        # Only attached peers get deliveries, and joining made the backlog.
        self.backlog.write(wire)  # type: ignore[union-attr]

    def slow_consumer(self) -> None:
        """FlowOwner: the peer does not read."""
        self.abort("slow consumer")

    def close(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason
        self.bus.detach(self)
        transport: Any = self.transport
        # A transport waits for its producer to go before it closes (TLS does).
        transport.unregisterProducer()
        transport.loseConnection()
        # Queued output may drain, but a peer that never reads (or never answers
        # TLS close_notify) must not hold the connection open forever.
        self._deadline = self.factory.clock.callLater(
            self.factory.close_timeout(), transport.abortConnection
        )

    def abort(self, reason: str) -> None:
        """Drop the connection now, discarding anything not yet sent."""
        self._closing = True
        self._close_reason = reason
        self.bus.detach(self)
        transport: Any = self.transport
        transport.abortConnection()

    def idle_timeout(self) -> None:
        """FlowOwner: the peer sent nothing for too long."""
        self.abort(f"idle for {self.factory.limits.idle_timeout:g} s")


class LineFactory(Factory):
    """Shared settings of one stream listener; builds a ``LineProtocol`` per connection."""

    noisy = False

    def __init__(
        self,
        bus: Bus,
        listener: StreamListenerConfig,
        limits: Limits,
        gateway_name: str,
        clock: IReactorTime,
        transport_name: str = "tcp",
        handshake_timeout: float | None = None,
        flow: FlowContext | None = None,
    ) -> None:
        self.bus = bus
        self.flow = flow if flow is not None else FlowContext(limits, bus.metrics, clock)
        self.listener = listener
        self.limits = limits
        self.gateway_name = gateway_name
        self.clock = clock
        self.transport_name = transport_name
        # None for plain TCP; for TLS, seconds from connect to a finished handshake.
        self.handshake_timeout = handshake_timeout
        # Set while the gateway drains: how long closed peers may take then.
        self.draining: float | None = None
        # Open connections, attached or closing; the gateway waits for them on shutdown.
        self.connections: set[LineProtocol] = set()

    def close_timeout(self) -> float:
        """How long a closed peer may take to drain its queued output (and, over TLS,
        to answer close_notify) before it is cut."""
        return self.draining if self.draining is not None else self.limits.handshake_timeout

    def buildProtocol(self, addr: Any) -> LineProtocol:
        return LineProtocol(self)
