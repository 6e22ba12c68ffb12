"""One DTLS session: a source whose cookie verified, from the rest of its handshake to its end.

``DtlsServer.accept`` makes a session from the connection whose
``DTLSv1_listen`` verified the cookie: OpenSSL keeps that ClientHello, and the
same connection goes on with ``do_handshake``. From then on the listener hands
the session every datagram from its source (``receive``) and sends what the
session gives its owner's ``transmit``. (``DtlsClient`` runs the other end on a
session too, from a client connection: ``begin`` sends its ClientHello.)

- Each application-data record is one message; ``send`` writes one message as
  one record, and refuses (returns False, sends nothing) a message that would
  not fit one datagram under the MTU: DTLS never splits a record, and OpenSSL
  would happily write a record bigger than the MTU.
- Records that do not decrypt, replays, records of another epoch and
  unexpected plaintext records are dropped by OpenSSL without a word; a
  datagram that is not whole DTLS records is dropped before OpenSSL sees it
  (``discarded``). Nothing raises out of a session: a fatal error ends it,
  with a reason.
- Retransmission: OpenSSL says how long until its next timeout
  (``DTLSv1_get_timeout``); the session waits that long on the injected clock
  and then calls ``DTLSv1_handle_timeout``. OpenSSL measures its timers on the
  real clock itself, so when the injected clock runs ahead of it (a test's
  ``Clock``) OpenSSL resends nothing yet and the session waits again for what
  OpenSSL says is left. The session itself never reads the time.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from gateway.dtls.cookies import Address
from gateway.dtls.records import pack, split
from gateway.tls.server import certificate_subject

READ_BYTES = 16384
"""The largest plaintext one DTLS record carries (2**14)."""

CLOSED = "closed by the gateway"
PEER_CLOSED = "closed by the peer"


class SessionOwner(Protocol):
    """Who a listener's sessions, and its cookie exchange, report to."""

    def transmit(self, datagram: bytes, address: Address) -> None:
        """Send ``datagram`` (at most the MTU) to ``address`` as one UDP datagram."""

    def handshake_completed(self, session: DtlsSession) -> None:
        """``session`` finished its handshake: it may ``send`` now."""

    def session_ended(self, session: DtlsSession, reason: str) -> None:
        """``session`` ended (once per session, ``close`` included); forget it."""


def describe(error: SSL.Error) -> str:
    """One line for an OpenSSL error: its reasons, e.g. ``certificate verify failed``."""
    details = error.args[0] if error.args else None
    if isinstance(details, list):
        reasons = [str(item[-1]) for item in details if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


def outgoing(connection: SSL.Connection, mtu: int) -> list[bytes]:
    """What OpenSSL wrote to ``connection``'s memory BIO, as datagrams of at most ``mtu``."""
    chunks: list[bytes] = []
    while True:
        try:
            chunks.append(connection.bio_read(65536))
        except SSL.WantReadError:
            break
    data = b"".join(chunks)
    if not data:
        return []
    records = split(data)
    return pack(records if records is not None else [data], mtu)


class DtlsSession:
    """The DTLS session of one source, after its cookie verified.

    ``handshake_done``, ``subject`` (who the peer's certificate names: the
    client's when one was required, the server's for a ``DtlsClient``) and
    ``max_message_bytes`` (the largest message ``send`` takes) are set once the
    handshake completes; ``ended`` and ``end_reason`` once it ends.
    ``discarded`` counts datagrams dropped as not whole DTLS records,
    ``retransmissions`` the flights OpenSSL sent again on a timeout.
    """

    def __init__(
        self,
        connection: SSL.Connection,
        address: Address,
        owner: SessionOwner,
        clock: IReactorTime,
        mtu: int,
    ) -> None:
        """Made by ``DtlsServer.accept`` (``connection`` has passed ``DTLSv1_listen``) and by
        ``DtlsClient`` (``connection`` is in the connect state)."""
        self.address = address
        self.handshake_done = False
        self.subject: str | None = None
        self.max_message_bytes = 0
        self.ended = False
        self.end_reason: str | None = None
        self.discarded = 0
        self.retransmissions = 0
        self._connection = connection
        self._owner = owner
        self._clock = clock
        self._mtu = mtu
        self._timer: IDelayedCall | None = None
        # The owner hears of a session only once accept has handed it out.
        self._announced = False

    def begin(self) -> str | None:
        """Answer the verified ClientHello; the reason when the handshake failed at once."""
        self._handshake()
        self._flush()
        self._rearm()
        self._announced = True
        return self.end_reason

    # Input

    def receive(self, datagram: bytes) -> list[bytes]:
        """The application messages in ``datagram`` (one per record), after the rest is handled.

        Handshake records move the handshake on (``handshake_completed`` may
        be called from here), a close_notify is answered and ends the session
        (``session_ended``); anything broken, replayed or forged gives nothing.
        """
        if self.ended:
            return []
        if not datagram or split(datagram) is None:
            self.discarded += 1
            return []
        self._connection.bio_write(datagram)
        messages: list[bytes] = []
        if not self.handshake_done:
            self._handshake()
        if self.handshake_done and not self.ended:
            self._read(messages)
        self._flush()
        self._rearm()
        return messages

    def _handshake(self) -> None:
        try:
            self._connection.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as e:
            self._end(f"handshake failed: {describe(e)}")
            return
        self.handshake_done = True
        self.max_message_bytes = self._connection.get_cleartext_mtu()
        cert = self._connection.get_peer_certificate(as_cryptography=True)
        self.subject = certificate_subject(cert) if cert is not None else None
        # The last flight goes out before the owner's first message.
        self._flush()
        self._rearm()
        if self._announced:
            self._owner.handshake_completed(self)

    def _read(self, messages: list[bytes]) -> None:
        while not self.ended:
            try:
                message = self._connection.recv(READ_BYTES)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self._shutdown()
                self._end(PEER_CLOSED)
                return
            except SSL.Error as e:
                self._end(f"protocol error: {describe(e)}")
                return
            if message:
                messages.append(message)

    # Output

    def send(self, message: bytes) -> bool:
        """Send ``message`` as one record in one datagram; False, and nothing sent, unless it fits.

        It fits when it is not empty, at most ``max_message_bytes`` long, the
        handshake is done and the session has not ended. The caller adds any
        framing (the gateway's ``\\n``) and counts a refusal as a drop.
        """
        if not self._write(message):
            return False
        self._flush()
        return True

    def send_all(self, messages: list[bytes]) -> int:
        """Send each of ``messages`` as one record, records packed into as few datagrams as fit.

        Returns how many were not sent (see ``send``).
        """
        refused = sum(1 for message in messages if not self._write(message))
        self._flush()
        return refused

    def _write(self, message: bytes) -> bool:
        if (
            self.ended
            or not self.handshake_done
            or not message
            or len(message) > self.max_message_bytes
        ):
            return False
        try:
            self._connection.send(message)
        except SSL.Error as e:
            self._end(f"protocol error: {describe(e)}")
            return False
        return True

    def _flush(self) -> None:
        for datagram in outgoing(self._connection, self._mtu):
            self._owner.transmit(datagram, self.address)

    # Ending

    def close(self, reason: str = CLOSED) -> None:
        """End the session: close_notify to the peer (once the handshake is done), then ``session_ended``."""
        if self.ended:
            return
        if self.handshake_done:
            self._shutdown()
        self._end(reason)

    def _shutdown(self) -> None:
        # A peer OpenSSL will not say goodbye to gets nothing more.
        with contextlib.suppress(SSL.Error):
            self._connection.shutdown()

    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self._flush()  # an alert or a close_notify
        self.ended = True
        self.end_reason = reason
        self._cancel_timer()
        if self._announced:
            self._owner.session_ended(self, reason)

    # Retransmission

    def _rearm(self) -> None:
        delay = None if self.ended else self._connection.DTLSv1_get_timeout()
        if delay is None:
            self._cancel_timer()
        elif self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._clock.callLater(delay, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.ended:
            return
        try:
            resent = self._connection.DTLSv1_handle_timeout()
        except SSL.Error as e:
            self._end(f"handshake timed out: {describe(e)}")
            return
        if resent:
            self.retransmissions += 1
        self._flush()
        self._rearm()
