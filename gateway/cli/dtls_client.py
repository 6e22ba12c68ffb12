"""``gateway client dtls://HOST:PORT``: one DTLS 1.2 session over a connected UDP port.

The handshake comes first: the server's certificate must chain to ``--ca``
(else to the system's CAs) and name HOST, and ``--cert``/``--key`` answer a
listener that asks for a client certificate. The gateway makes the session a
peer once it is done; only then is standard input read. Each line is sent as
one record with ``\\n`` appended (after the sign-in and ``--subscribe``
requests, as on every transport), each record received is printed as one line,
and end of input sends a close_notify and exits 0. A close_notify from the
gateway exits 0 too; a failed handshake exits 1 saying why.

A record holding only ``\\n`` every ``--keepalive`` seconds keeps the session
from the listener's ``peer_timeout``: the gateway relays no empty message.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any, BinaryIO

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, ISystemHandle
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall

from gateway.cli.speech import Speech, StdinLines
from gateway.dtls.client import DtlsClient, client_context, client_files
from gateway.dtls.session import PEER_CLOSED
from gateway.tls.files import TlsFileError

HANDSHAKE_TIMEOUT = 10.0
"""Seconds the handshake may take (as long as a TCP client waits to connect)."""
HANDSHAKE_FAILED = "handshake failed: "


class DtlsLineClient(DatagramProtocol):
    """The terminal's DTLS session: stdin lines out as records, records in as stdout lines."""

    noisy = False

    def __init__(
        self,
        reactor: Any,
        url: str,
        address: tuple[str, int],
        hostname: str,
        context: SSL.Context,
        out: BinaryIO,
        done: Deferred[int],
        keepalive: float = 20.0,
        speech: Speech | None = None,
    ) -> None:
        """A session to ``address``, whose certificate must name ``hostname``; ``done`` fires
        with the exit status."""
        self.reactor = reactor
        self.url = url
        self.address = address
        self.session = DtlsClient(context, hostname, self, reactor)
        self.out = out
        self.done = done
        self.speech = speech if speech is not None else Speech()
        self.keepalive = LoopingCall(self._keep_alive)
        self.keepalive.clock = reactor
        self.keepalive_interval = keepalive
        self._deadline: IDelayedCall | None = None
        self._port: ISystemHandle | None = None
        self._closing = False
        self._finished = False

    def startProtocol(self) -> None:
        assert self.transport is not None
        self._port = ISystemHandle(self.transport, None)
        self.transport.connect(*self.address)
        self._deadline = self.reactor.callLater(HANDSHAKE_TIMEOUT, self._too_slow)
        self.session.start()

    # The session's owner (``ClientOwner``)

    def transmit(self, datagram: bytes) -> None:
        """A datagram for the gateway."""
        if self._finished or self.transport is None:
            return
        try:
            self.transport.write(datagram, self.address)
        except OSError as e:
            self._finish(1, f"cannot send to {self.url}: {e.strerror or e}")

    def handshake_completed(self) -> None:
        """The gateway is verified and we are its peer: sign in, then read standard input."""
        self._cancel_deadline()
        speech = self.speech
        for request in speech.opening():
            self._send_line(request)
        if self.keepalive_interval > 0:
            self.keepalive.start(self.keepalive_interval, now=False)
        StandardIO(
            StdinLines(lambda line: self._send_line(speech.line(line)), self._end_of_input),
            reactor=self.reactor,
        )

    def session_ended(self, reason: str) -> None:
        """Our close_notify, the gateway's, or a failure."""
        if self._closing or reason == PEER_CLOSED:
            self._finish(0)
        elif not self.session.handshake_done:
            why = reason.removeprefix(HANDSHAKE_FAILED)
            self._finish(1, f"DTLS handshake with {self.url} failed: {why}")
        else:
            self._finish(1, f"DTLS session with {self.url} ended: {reason}")

    # Datagrams in

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        records = self.session.receive(datagram)
        for record in records:
            self.out.write(record.removesuffix(b"\n") + b"\n")
        if records:
            self.out.flush()

    def connectionRefused(self) -> None:
        self._finish(1, f"nothing is listening at {self.url}")

    def stopProtocol(self) -> None:
        """The port closed. Twisted closes it by itself when epoll reports the socket's error
        alone (an ICMP port unreachable, before anything was read): say so."""
        handle = self._port.getHandle() if self._port is not None else None
        if self._finished or not isinstance(handle, socket.socket):
            return
        error = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error == errno.ECONNREFUSED:
            self.connectionRefused()
        elif error:
            self._finish(1, f"cannot reach {self.url}: {os.strerror(error)}")

    # Lines out

    def _send_line(self, line: bytes) -> None:
        if self.session.send(line + b"\n") or self.session.ended:
            return
        most = self.session.max_message_bytes - 1
        print(
            f"gateway client: a line of {len(line)} bytes does not fit one DTLS record "
            f"(at most {most}): not sent",
            file=sys.stderr,
        )

    def _keep_alive(self) -> None:
        self.session.send(b"\n")

    def _end_of_input(self) -> None:
        if self._finished:
            return
        self._closing = True
        self.session.close()  # close_notify, then session_ended

    # The end

    def _too_slow(self) -> None:
        self._deadline = None
        self._finish(1, f"no DTLS handshake with {self.url} within {HANDSHAKE_TIMEOUT:g} s")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _finish(self, code: int, problem: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True  # nothing more is sent
        if problem is not None:
            print(f"gateway client: {problem}", file=sys.stderr)
        if self.keepalive.running:
            self.keepalive.stop()
        self._cancel_deadline()
        self.session.close()  # its timers stop
        if not self.done.called:
            self.done.callback(code)


async def run(
    reactor: Any,
    url: str,
    address: tuple[str, int],
    out: BinaryIO,
    speech: Speech,
    keepalive: float = 20.0,
    files: tuple[str | None, str | None, str | None] = (None, None, None),
) -> int:
    """Run ``gateway client dtls://HOST:PORT`` (``address`` is HOST and PORT); the exit status.

    ``files`` are the ``--ca``, ``--cert`` and ``--key`` paths given.
    """
    host, port = address
    ca, cert, key = (Path(path) if path else None for path in files)
    try:
        trust, certificate = client_files(ca, cert, key)
        context = client_context(trust, certificate)
    except TlsFileError as e:
        print(f"gateway client: --{e.key}: {e.problem}", file=sys.stderr)
        return 2
    try:
        ip = await reactor.resolve(host)
    except Exception as e:
        print(f"gateway client: cannot resolve {host}: {e}", file=sys.stderr)
        return 1
    done: Deferred[int] = Deferred()
    protocol = DtlsLineClient(reactor, url, (ip, port), host, context, out, done, keepalive, speech)
    reactor.listenUDP(0, protocol, interface="::" if ":" in ip else "", maxPacketSize=65536)
    return await done
