"""TLS written straight to an idle socket: ciphertext leaves in the step that made it.

``TLSMemoryBIOProtocol`` hands every record it makes to the TCP transport, and
Twisted's ``transport.write`` always buffers: two ``epoll_ctl`` calls and a loop
turn before the ``send``, for every receiver of every batch. ``SocketThrough``
stands between the two: while Twisted holds nothing for the socket it sends at
once, and only what the socket does not take goes through the transport. It
learns that the transport drained as a *pull* producer registered with it (Twisted
asks a pull producer for more each time its buffer empties), and pauses the TLS
layer's producer, as the transport itself would, while more than the transport's
buffer size waits there. TLS is the only writer of its TCP transport, so bytes
never overtake each other.

Twisted's TLS layer encrypts at most 16 KiB per ``SSL_write`` and hands each
record on at once: a 64 KiB batch would cost four ``send`` calls.
``ThroughTLSProtocol.write`` gathers the records one ``write`` makes and sends them
together, in one ``send`` (it is the syscalls, not the copy, that cost).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.tcp import Connection
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import directlyProvides, implementer, providedBy

BUFFER = 64 * 1024
"""Bytes the TCP transport may hold before the TLS layer's producer is paused (as
Twisted's own ``FileDescriptor.bufferSize``)."""


class SocketThrough:
    """The TCP transport as the TLS layer sees it: ``write`` sends at once when idle;
    everything else is the transport's own (it provides the same interfaces)."""

    def __init__(self, transport: Connection) -> None:
        self.transport = transport
        self.send: Callable[[bytes], int] = transport.getHandle().send
        self.idle: bool | None = True  # None: closing, everything through the transport
        self.queued = 0
        self.paused = False
        self.producer: IPushProducer | None = None
        self.gathered: list[bytes] | None = None  # a list while one TLS write runs
        directlyProvides(self, providedBy(transport))
        transport.registerProducer(_Drained(self), False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def write(self, data: bytes) -> None:
        if self.gathered is not None:
            self.gathered.append(data)
            return
        if self.idle:
            try:
                sent = self.send(data)
            except OSError:
                sent = 0  # full (EAGAIN), or broken: the transport will find out and close
            if sent == len(data):
                return
            self.idle = False
            data = data[sent:]
        self.queued += len(data)
        if self.queued > BUFFER and not self.paused and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()
        self.transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def gather(self) -> bool:
        """Hold what is written until ``send_gathered`` (False: already holding)."""
        if self.gathered is not None:
            return False
        self.gathered = []
        return True

    def send_gathered(self) -> None:
        gathered, self.gathered = self.gathered, None
        if gathered:
            self.write(gathered[0] if len(gathered) == 1 else b"".join(gathered))

    def loseConnection(self) -> None:
        """Twisted closes a transport only once no producer is registered: stop hearing
        of drains (whatever follows goes through the transport) and let it close."""
        self._release()
        self.transport.loseConnection()

    def loseWriteConnection(self) -> None:
        self._release()
        self.transport.loseWriteConnection()

    def _release(self) -> None:
        if self.idle is not None:
            self.idle = None
            self.transport.unregisterProducer()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """The TLS layer's producer (always a push producer): paused and resumed here."""
        self.producer = producer
        if self.paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def drained(self) -> None:
        """Twisted holds nothing for the socket any more."""
        if self.idle is None:
            return
        self.idle = True
        self.queued = 0
        if self.paused:
            self.paused = False
            if self.producer is not None:
                self.producer.resumeProducing()

    def stopped(self) -> None:
        if self.producer is not None:
            self.producer.stopProducing()


@implementer(IPullProducer)
class _Drained:
    """What the TCP transport tells: its buffer drained (or the connection is gone)."""

    __slots__ = ("registered", "through")

    def __init__(self, through: SocketThrough) -> None:
        self.through = through
        # Twisted asks a pull producer for data as it registers it: not a drain.
        self.registered = False

    def resumeProducing(self) -> None:
        if not self.registered:
            self.registered = True
            return
        self.through.drained()

    def stopProducing(self) -> None:
        self.through.stopped()


class ThroughTLSProtocol(TLSMemoryBIOProtocol):
    """``TLSMemoryBIOProtocol`` over a ``SocketThrough`` when under a real TCP connection;
    the records of one ``write`` leave together.

    Once the handshake is done and nothing waits in the TLS layer, a write is encrypted
    whole by one ``SSL_write`` (the listeners' contexts have partial writes off, so
    OpenSSL makes all of its records in one call) and its ciphertext read from the
    memory BIO at once: Twisted's own ``write`` makes an ``SSL_write`` and a BIO read
    per 16 KiB. Anything else (the handshake, pending writes, a closing connection, an
    OpenSSL error) takes Twisted's path, which knows how to handle it. The state this
    looks at is Twisted's (``_handshakeDone``, ``_appSendBuffer``,
    ``_lostTLSConnection``); ``tests/test_tls_through.py`` checks those names are still
    Twisted's, so an upgrade that renames them fails a test rather than this quietly.
    """

    through: SocketThrough | None = None

    def makeConnection(self, transport: Any) -> None:
        if isinstance(transport, Connection):
            transport = self.through = SocketThrough(transport)
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def write(self, data: bytes) -> None:
        through = self.through
        if through is None or not through.gather():
            super().write(data)  # type: ignore[no-untyped-call]
            return
        try:
            if not (
                self._handshakeDone
                and not self._appSendBuffer
                and not self.disconnecting
                and not self._lostTLSConnection
                and self._encrypt(data, through)
            ):
                super().write(data)  # type: ignore[no-untyped-call]
        finally:
            through.send_gathered()

    def _encrypt(self, data: bytes, through: SocketThrough) -> bool:
        """Encrypt ``data`` and hand its records to ``through``; False: OpenSSL took
        none of it (Twisted's path will see why)."""
        tls: SSL.Connection = self.getHandle()  # type: ignore[no-untyped-call]
        sent = 0
        try:
            sent = tls.send(data)
            if sent < len(data):  # partial writes on (not a listener's context)
                view = memoryview(data)
                while sent < len(data):
                    sent += tls.send(view[sent:])
        except SSL.Error:
            if not sent:
                return False
            # The records made so far wait in the BIO; Twisted's path adds the rest after them.
            super().write(data[sent:])  # type: ignore[no-untyped-call]
        # A memory BIO hands out all it holds up to the size asked for: a shorter
        # read means it is empty.
        size = len(data) + (len(data) >> 6) + 1024  # room for every record's overhead
        while True:
            try:
                chunk = tls.bio_read(size)
            except SSL.WantReadError:
                return True
            through.write(chunk)
            if len(chunk) < size:
                return True
