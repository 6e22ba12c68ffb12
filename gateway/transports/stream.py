"""A ``tcp`` or ``tls`` connection, whatever its framing: the Twisted protocol side.

``StreamProtocol`` adds to the shared lifecycle (``StreamPeer``) what every
byte-stream connection of a ``tcp``/``tls`` listener does the same way: TCP
options and the handshake deadline on connect, joining once the TLS handshake
is done, closing and aborting, and cutting a peer that sends a message over
``max_message_bytes``. Each framing (``gateway.transports.line``,
``gateway.transports.binary``) adds only how it reads messages.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config.listeners import TcpListenerConfig
from gateway.core.interfaces import IPeer
from gateway.tls.server import peer_subject
from gateway.transports.lifecycle import StreamPeer
from gateway.transports.runtime import ListenerRuntime


@implementer(IPeer, IHandshakeListener)
class StreamProtocol(StreamPeer, Protocol):
    """One connection of a ``tcp``/``tls`` listener; subclasses implement ``dataReceived``."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self._init_peer(runtime, runtime.config.type)
        config = runtime.config
        assert isinstance(config, TcpListenerConfig)
        self.config = config
        self.max_message_bytes = runtime.limits.max_message_bytes
        self._buffer = b""

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

    # Signing in

    # Bytes a message may take on the wire beyond ``max_message_bytes`` (lines: the '\r').
    message_slack = 0

    def _hold(self, pending: bytes) -> None:
        """Keep ``pending`` (all that waits) while a sign-in is checked: reading is paused,
        so only what was in flight arrives meanwhile, but a peer must not make it grow
        without bound."""
        self._buffer = pending
        if len(pending) > 2 * (self.max_message_bytes + self.message_slack) + 65536:
            self._too_long(len(pending))

    # Too long

    def _too_long(self, size: int) -> None:
        """A message over ``max_message_bytes``: logged, counted, and the peer closed
        (told why first, unless its framing is binary: no text goes into a binary stream)."""
        limit = self.max_message_bytes
        self.peer_log.warn(
            "{peer} sent a message of at least {size} bytes (limit {limit}); closing",
            peer=self.origin.peer_id or self.address,
            size=size,
            limit=limit,
        )
        self._oversize()
        if self.origin.peer_id and not self.quiet:
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
