"""``gateway client URL``: a terminal client for any gateway listener.

Prints every message received, sends each line of standard input, and exits
on end of input or when the server closes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.cli import dtls_client
from gateway.cli.speech import Speech, Stdin, StdinLines
from gateway.tls.client import client_options
from gateway.tls.files import TlsFileError
from gateway.transports.datagram import wire as udp
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL

SCHEMES = ("tcp", "tls", "udp", "dtls", "ws", "wss")
CLOSE_WAIT = 10.0
"""Seconds a WebSocket client waits for the server to answer its close."""


class UsageError(Exception):
    """A bad client URL; ``str()`` is the message."""


def parse_url(url: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT`` -> ("tcp", HOST, PORT); ws/wss ports default to 80/443."""
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss") and parts.hostname and parts.port is None:
        return parts.scheme, parts.hostname, 443 if parts.scheme == "wss" else 80
    if parts.scheme not in SCHEMES:
        raise UsageError(
            f"unsupported URL {url!r}: expected one of "
            + ", ".join(f"{s}://HOST:PORT" for s in SCHEMES)
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UsageError(f"bad URL {url!r}: expected {parts.scheme}://HOST:PORT")
    return parts.scheme, parts.hostname, port


@implementer(IHandshakeListener)
class _StreamClient(Protocol):
    """The network side of a TCP or TLS session: bytes in both directions, unchanged."""

    def __init__(
        self,
        reactor: Any,
        out: BinaryIO,
        done: Deferred[int],
        secure: bool,
        hostname: str,
        speech: Speech,
    ) -> None:
        self.speech = speech
        self.reactor = reactor
        self.secure = secure
        self.hostname = hostname
        self.out = out
        self.done = done

    def connectionMade(self) -> None:
        if not self.secure:
            self._start_input()

    def handshakeCompleted(self) -> None:
        """TLS: read standard input only once the server is verified."""
        self._start_input()

    def _start_input(self) -> None:
        assert self.transport is not None
        transport = self.transport
        speech = self.speech
        for request in speech.opening():
            transport.write(request + b"\n")
        if not speech.json:
            StandardIO(Stdin(transport.write, transport.loseConnection), reactor=self.reactor)
            return
        StandardIO(
            StdinLines(
                lambda line: transport.write(speech.line(line) + b"\n"), transport.loseConnection
            ),
            reactor=self.reactor,
        )

    def dataReceived(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def connectionLost(self, reason: Failure | None = None) -> None:
        code = 0
        if reason is not None and not reason.check(ConnectionDone):
            code = 1
            print(
                f"gateway client: connection lost: {_describe(reason, self.hostname)}",
                file=sys.stderr,
            )
        if not self.done.called:
            self.done.callback(code)


def _describe(reason: Failure, hostname: str) -> str:
    """A connection failure in words; TLS failures say so."""
    if reason.check(VerificationError):
        return (
            f"TLS handshake failed: the server's certificate is not valid for {hostname!r} "
            "(hostname mismatch)"
        )
    if reason.check(SSL.Error):
        return f"TLS handshake failed: {reason.value}"
    return str(reason.getErrorMessage())


class _StreamClientFactory(ClientFactory):
    noisy = False

    def __init__(
        self,
        reactor: Any,
        out: BinaryIO,
        done: Deferred[int],
        where: str,
        hostname: str,
        secure: bool = False,
        speech: Speech | None = None,
    ) -> None:
        self.speech = speech if speech is not None else Speech()
        self.hostname = hostname
        self.reactor = reactor
        self.out = out
        self.done = done
        self.where = where
        self.secure = secure

    def buildProtocol(self, addr: Any) -> _StreamClient:
        return _StreamClient(
            self.reactor, self.out, self.done, self.secure, self.hostname, self.speech
        )

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        print(
            f"gateway client: cannot connect to {self.where}: {reason.getErrorMessage()}",
            file=sys.stderr,
        )
        if not self.done.called:
            self.done.callback(1)


class _DatagramClient(DatagramProtocol):
    """A UDP session: one datagram per line, after the gateway's address check.

    It sends a padded hello at start and as its keepalive. A gateway with
    ``challenge = true`` answers a hello from an unverified address with a
    challenge, which is answered at once; one with ``challenge = false`` takes
    the hello as registration and answers nothing. Lines read before either is
    known are held (at most ``HANDSHAKE_GRACE`` seconds), since a challenging
    gateway drops messages from addresses it has not verified yet.
    """

    noisy = False
    HANDSHAKE_GRACE = 0.5

    def __init__(
        self,
        reactor: Any,
        address: tuple[str, int],
        out: BinaryIO,
        done: Deferred[int],
        keepalive: float,
        speech: Speech | None = None,
    ) -> None:
        self.speech = speech if speech is not None else Speech()
        self.reactor = reactor
        self.address = address
        self.out = out
        self.done = done
        self.keepalive = LoopingCall(self._register)
        self.keepalive.clock = reactor
        self.keepalive_interval = keepalive
        self._held: list[bytes] | None = []
        self._ending = False
        self._grace: IDelayedCall | None = None

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(*self.address)
        self._grace = self.reactor.callLater(self.HANDSHAKE_GRACE, self._ready)
        if self.keepalive_interval > 0:
            self.keepalive.start(self.keepalive_interval, now=True)
        else:
            self._register()
        for request in self.speech.opening():
            self._send_line(request)
        speech = self.speech
        StandardIO(
            StdinLines(lambda line: self._send_line(speech.line(line)), self._end),
            reactor=self.reactor,
        )

    def _register(self) -> None:
        # Registers us (or keeps us registered) and is never relayed; padded so a
        # challenging gateway may answer it (it never sends more than it got).
        self._send(udp.hello())

    def _ready(self) -> None:
        """The gateway takes our messages now (or, with no challenge, we assume so)."""
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        held, self._held = self._held, None
        for line in held or ():
            self._send(line)
        if self._ending:
            self._ending = False
            self._finish(0)

    def _send(self, datagram: bytes) -> None:
        assert self.transport is not None
        try:
            self.transport.write(datagram, self.address)
        except OSError as e:
            self._finish(1, f"cannot send: {e.strerror or e}")

    def _send_line(self, line: bytes) -> None:
        if self._held is not None:
            self._held.append(line)
        else:
            self._send(line)

    def _end(self) -> None:
        if self._held is not None:
            self._ending = True
        else:
            self._finish(0)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        control = udp.parse_control(datagram)
        if control is None:
            self._ready()  # bus traffic: we are a peer
            self.out.write(datagram)
            self.out.flush()
            return
        verb, cookie = control
        if verb == b"challenge" and 0 < len(cookie) <= 128:
            self._send(udp.response(cookie))
            self._ready()

    def connectionRefused(self) -> None:
        host, port = self.address
        self._finish(1, f"nothing is listening at udp://{host}:{port}")

    def _finish(self, code: int, problem: str | None = None) -> None:
        if problem is not None:
            print(f"gateway client: {problem}", file=sys.stderr)
        if self.keepalive.running:
            self.keepalive.stop()
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        if not self.done.called:
            self.done.callback(code)


class _WebSocketClient(WebSocketClientProtocol):
    """A WebSocket session: each stdin line one message, each message one output line."""

    def __init__(self, session: _WebSocketSession) -> None:
        super().__init__()
        self.session = session

    def onOpen(self) -> None:
        for request in self.session.speech.opening():
            self.sendMessage(request, isBinary=False)  # type: ignore[no-untyped-call]
        StandardIO(StdinLines(self._send_line, self._end), reactor=self.session.reactor)

    def _send_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        line = self.session.speech.line(line)
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            self.sendMessage(line, isBinary=True)  # type: ignore[no-untyped-call]
        else:
            self.sendMessage(line, isBinary=False)  # type: ignore[no-untyped-call]

    def _end(self) -> None:
        self.sendClose(code=1000)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.session.out.write(payload + b"\n")
        self.session.out.flush()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session = self.session
        if code in (1000, 1001) or (wasClean and code is None):
            session.finish(0)
        elif code is None or code == 1006:
            session.finish(1, f"connection to {session.url} lost: {reason or 'no close frame'}")
        else:
            session.finish(
                1, f"closed by {session.url} with code {code}: {reason or ''}".rstrip(": ")
            )


class _WebSocketSession(WebSocketClientFactory):
    noisy = False

    def __init__(
        self, reactor: Any, url: str, out: BinaryIO, done: Deferred[int], speech: Speech
    ) -> None:
        protocols = [JSON_SUBPROTOCOL] if speech.json else None
        super().__init__(url, protocols=protocols)  # type: ignore[no-untyped-call]
        self.speech = speech
        self.reactor = reactor
        self.url = url
        self.out = out
        self.done = done
        # Not Autobahn's 1 s: on a busy machine a clean end of input became "connection lost".
        wait = {"closeHandshakeTimeout": CLOSE_WAIT, "serverConnectionDropTimeout": CLOSE_WAIT}
        self.setProtocolOptions(perMessageCompressionOffers=[], autoPingInterval=0, **wait)  # type: ignore[no-untyped-call]

    def buildProtocol(self, addr: Any) -> _WebSocketClient:
        protocol = _WebSocketClient(self)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.finish(1, f"cannot connect to {self.url}: {reason.getErrorMessage()}")

    def finish(self, code: int, problem: str | None = None) -> None:
        if problem is not None:
            print(f"gateway client: {problem}", file=sys.stderr)
        if not self.done.called:
            self.done.callback(code)


async def run(
    reactor: Any,
    url: str,
    keepalive: float = 20.0,
    out: BinaryIO | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    speech: Speech | None = None,
) -> int:
    """Run a client session to ``url``; returns the exit status."""
    speech = speech if speech is not None else Speech()
    try:
        scheme, host, port = parse_url(url)
    except UsageError as e:
        print(f"gateway client: {e}", file=sys.stderr)
        return 2
    out = out if out is not None else sys.stdout.buffer
    if scheme == "dtls":
        files = (ca, cert, key)
        return await dtls_client.run(reactor, url, (host, port), out, speech, keepalive, files)
    done: Deferred[int] = Deferred()
    if scheme == "tcp":
        factory = _StreamClientFactory(reactor, out, done, url, host, speech=speech)
        reactor.connectTCP(host, port, factory, timeout=10)
    elif scheme == "tls":
        try:
            options = client_options(
                host,
                Path(ca) if ca else None,
                Path(cert) if cert else None,
                Path(key) if key else None,
            )
        except TlsFileError as e:
            print(f"gateway client: --{e.key}: {e.problem}", file=sys.stderr)
            return 2
        factory = _StreamClientFactory(reactor, out, done, url, host, secure=True, speech=speech)
        reactor.connectSSL(host, port, factory, options, timeout=10)
    elif scheme in ("ws", "wss"):
        session = _WebSocketSession(reactor, url, out, done, speech)
        if scheme == "wss":
            try:
                options = client_options(host, Path(ca) if ca else None, None, None)
            except TlsFileError as e:
                print(f"gateway client: --{e.key}: {e.problem}", file=sys.stderr)
                return 2
            reactor.connectSSL(host, port, session, options, timeout=10)
        else:
            reactor.connectTCP(host, port, session, timeout=10)
    else:
        try:
            address = await reactor.resolve(host)
        except Exception as e:
            print(f"gateway client: cannot resolve {host}: {e}", file=sys.stderr)
            return 1
        reactor.listenUDP(
            0,
            _DatagramClient(reactor, (address, port), out, done, keepalive, speech),
            interface="::" if ":" in address else "",
            maxPacketSize=65536,
        )
    return await done
