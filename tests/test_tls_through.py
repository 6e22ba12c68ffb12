"""TLS written straight to an idle socket (``gateway.tls.through``), over a real socket
pair: the server side is Twisted's TCP transport on a ``MemoryReactor`` (its buffer
drained by hand), the client the standard library's TLS on memory BIOs."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Connection
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from gateway.config import TlsSettings
from gateway.tls.pki import issue_certificate, make_ca, pem, pem_key
from gateway.tls.server import SSL_MODE_ENABLE_PARTIAL_WRITE, ServerTls
from gateway.tls.through import SocketThrough, ThroughTLSProtocol


class Sink(Protocol):
    """The application under the server's TLS layer."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@implementer(IPushProducer)
class Producer:
    """The application's producer, as the gateway's backlog is: told to pause and resume."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Pair:
    """A handshaken TLS connection over ``socket.socketpair()``."""

    def __init__(self, directory: Path, early: bytes = b"", partial: bool = False) -> None:
        """``early``: what the application writes before the handshake is done;
        ``partial``: partial writes on, as pyOpenSSL leaves a context it makes."""
        ca, ca_key = make_ca("Test CA")
        cert, key = issue_certificate(ca, ca_key, "localhost", ("localhost",))
        (directory / "ca.pem").write_bytes(pem(ca))
        (directory / "server.pem").write_bytes(pem(cert))
        (directory / "server.key").write_bytes(pem_key(key))
        settings = TlsSettings(cert=directory / "server.pem", key=directory / "server.key")
        self.server_sock, self.client_sock = socket.socketpair()
        self.client_sock.setblocking(False)
        self.app = Sink()
        server_tls = ServerTls(settings)
        if partial:
            server_tls._context.set_mode(SSL_MODE_ENABLE_PARTIAL_WRITE)
        factory = TLSMemoryBIOFactory(server_tls, False, Factory.forProtocol(lambda: self.app))
        factory.protocol = ThroughTLSProtocol
        self.tls = factory.buildProtocol(None)
        assert isinstance(self.tls, ThroughTLSProtocol)
        self.connection = Connection(self.server_sock, self.tls, MemoryReactor())
        self.connection.connected = True  # as Twisted's TCP server sets it, once accepted
        self.tls.makeConnection(self.connection)
        if early:
            self.tls.write(early)
        assert self.tls.through is not None
        self.through: SocketThrough = self.tls.through
        self.sends: list[int] = []
        send = self.through.send

        def counted(data: bytes) -> int:
            self.sends.append(len(data))
            return send(data)

        self.through.send = counted
        context = ssl.create_default_context(cafile=directory / "ca.pem")
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.closed = False  # the client read the server's close_notify
        while True:
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.to_server()
                self.from_server()
        self.to_server()  # the client's Finished
        self.early = self.read()  # and session tickets
        self.sends.clear()

    def to_server(self) -> None:
        data = self.outgoing.read()
        if data:
            self.tls.dataReceived(data)

    def from_server(self) -> bytes:
        """Whatever the server's socket has sent, read off the client's end."""
        chunks = []
        while True:
            try:
                chunk = self.client_sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        self.incoming.write(data)
        if chunks and not chunk:  # the server closed the TCP connection after that
            self.incoming.write_eof()
        return data

    def read(self) -> bytes:
        """The plaintext the client can read now."""
        self.from_server()
        out = []
        while True:
            try:
                chunk = self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:  # only after the server's close_notify
                self.closed = True
                break
            out.append(chunk)
        return b"".join(out)

    def drain(self) -> None:
        """What the reactor would do once the socket is writable again."""
        self.connection.doWrite()


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    """Pairs made with ``Pair``'s options; their sockets are closed after the test."""
    made: list[Pair] = []

    def make(**options: Any) -> Pair:
        made.append(Pair(tmp_path, **options))
        return made[-1]

    yield make
    for each in made:
        each.server_sock.close()
        each.client_sock.close()


@pytest.fixture
def pair(make_pair: Callable[..., Pair]) -> Pair:
    return make_pair()


def numbered(count: int) -> bytes:
    return b"".join(b"%08d" % i + b"x" * 91 + b"\n" for i in range(count))


def test_the_records_of_one_write_leave_in_one_send(pair: Pair) -> None:
    batch = numbered(600)  # 60 KB: four TLS records
    pair.tls.write(batch)
    assert len(pair.sends) == 1 and pair.sends[0] > len(batch)
    assert pair.read() == batch
    pair.tls.writeSequence([b"one\n", b"two\n"])
    assert len(pair.sends) == 2
    assert pair.read() == b"one\ntwo\n"


def test_a_context_with_partial_writes_still_gets_a_write_whole(
    make_pair: Callable[..., Pair],
) -> None:
    """With partial writes on, each SSL_write takes one record: the rest must follow."""
    pair = make_pair(partial=True)
    batch = numbered(600)
    pair.tls.write(batch)
    assert len(pair.sends) == 1
    assert pair.read() == batch


def test_what_a_full_socket_does_not_take_waits_in_order_and_pauses_past_the_buffer(
    pair: Pair,
) -> None:
    pair.server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    producer = Producer()
    pair.tls.registerProducer(producer, True)
    flood = numbered(4000)  # 400 KB, far more than the socket takes
    for start in range(0, len(flood), 40_000):
        pair.tls.write(flood[start : start + 40_000])
    assert not pair.through.idle
    assert producer.paused  # over 64 KiB waits in Twisted's buffer
    received = b""
    while not pair.through.idle:
        received += pair.read()
        pair.drain()
    received += pair.read()
    assert received == flood
    assert not producer.paused
    pair.tls.write(b"after\n")  # written through again
    assert pair.read() == b"after\n"


def test_what_was_written_before_a_close_arrives_before_the_close(pair: Pair) -> None:
    batch = numbered(400)
    pair.tls.write(batch)
    pair.tls.loseConnection()  # close_notify, then the TCP close once drained
    pair.drain()
    assert pair.read() == batch
    assert pair.closed


def test_what_was_written_before_the_handshake_comes_first(
    make_pair: Callable[..., Pair],
) -> None:
    """A welcome written as the connection is made waits in Twisted's TLS layer until the
    handshake is done; what is written next must not overtake it."""
    pair = make_pair(early=b"welcome\n")
    assert pair.early == b"welcome\n"
    pair.tls.write(b"next\n")
    assert pair.read() == b"next\n"


def test_the_twisted_state_the_fast_path_reads_is_still_there(pair: Pair) -> None:
    """``ThroughTLSProtocol.write`` reads three of Twisted's own attributes to know that
    the handshake is done and nothing waits: a Twisted that renamed them fails here."""
    tls = pair.tls
    assert tls._handshakeDone is True
    assert tls._appSendBuffer == []
    assert tls._lostTLSConnection is False
    tls.loseConnection()
    assert tls.disconnecting
