"""The DTLS side of one listener: its context, and the cookie exchange before any session.

Before a source's cookie verifies, the listener keeps nothing for it and sends
it no more bytes than it sent: ``accept`` builds a throwaway connection on
memory BIOs (from the one shared context), feeds it the datagram and calls
``DTLSv1_listen``. Without a valid cookie OpenSSL answers with a
HelloVerifyRequest carrying one (sent only when it is no bigger than the
ClientHello it answers; with 16-byte cookies it is 44 bytes, and the smallest
ClientHello is 67), and the connection is dropped. With a valid cookie the
same connection becomes the source's ``DtlsSession`` and goes on with the
handshake.

What the listener does with it (it owns the table of sessions by source):

- a datagram from a source with a session goes to ``session.receive``;
- a datagram from any other source goes to ``accept``; on ``ACCEPTED`` keep
  ``admission.session`` for that source until ``session_ended``;
- a ClientHello (``records.is_client_hello``) from a source whose session has
  finished its handshake is a client that restarted on the same port: pass it
  to ``accept`` as well, and on ``ACCEPTED`` close the old session for the new
  one (RFC 6347 4.2.8). OpenSSL ignores such a ClientHello inside a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime

from gateway.dtls.context import server_context
from gateway.dtls.cookies import Address, Cookies
from gateway.dtls.records import is_client_hello, split
from gateway.dtls.session import DtlsSession, SessionOwner, outgoing
from gateway.tls.files import Material
from gateway.tls.pki import fingerprint

DEFAULT_MTU = 1400
"""The largest datagram sent (UDP payload): well under Ethernet's 1500 with IPv6 and tunnels."""
MIN_MTU = 256
"""OpenSSL ignores a smaller MTU (and a memory BIO cannot tell it another)."""
MAX_MTU = 65507
"""The largest UDP payload over IPv4."""


class Outcome(Enum):
    """What ``accept`` did with a datagram from a source without a session."""

    ACCEPTED = "accepted"
    """The cookie verified: ``Admission.session`` is the source's new session."""
    CHALLENGED = "challenged"
    """A ClientHello without a cookie: a HelloVerifyRequest was sent."""
    BAD_COOKIE = "bad_cookie"
    """A wrong or expired cookie (or one made for another source): challenged again."""
    REFUSED = "refused"
    """The cookie verified but the handshake failed at once (``Admission.reason``), e.g. DTLS 1.0."""
    IGNORED = "ignored"
    """Not a ClientHello OpenSSL would answer: nothing sent."""
    UNANSWERED = "unanswered"
    """The HelloVerifyRequest would have been bigger than the datagram: nothing sent."""


@dataclass(frozen=True)
class Admission:
    """The outcome of ``accept``, and the session when there is one."""

    outcome: Outcome
    session: DtlsSession | None = None
    reason: str | None = None


@dataclass
class _Stranger:
    """The app data of a connection (the cookie callbacks see only the connection)."""

    address: Address
    cookie_refused: bool = False


class DtlsServer:
    """The DTLS server of one listener: one context, its cookies, and the sessions it starts.

    ``material`` is the listener's certificate, key and client CAs
    (``gateway.tls.files.load_material``); ``mtu`` the largest datagram any
    session sends. ``owner`` is told of every datagram to send and of every
    session's handshake and end; ``clock`` drives cookie windows and
    retransmission.
    """

    def __init__(
        self,
        material: Material,
        owner: SessionOwner,
        clock: IReactorTime,
        *,
        mtu: int = DEFAULT_MTU,
        secret: bytes | None = None,
    ) -> None:
        """Raises ``TlsFileError`` when OpenSSL refuses ``material``, ValueError for a bad ``mtu``."""
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu must be from {MIN_MTU} to {MAX_MTU} bytes, not {mtu}")
        self.owner = owner
        self.clock = clock
        self.mtu = mtu
        self.cookies = Cookies(clock, secret)
        self._context, self.fingerprint = self._build(material)

    def _build(self, material: Material) -> tuple[SSL.Context, str]:
        context = server_context(material, self._make_cookie, self._check_cookie)
        return context, fingerprint(material.chain[0])

    def reload(self, material: Material) -> None:
        """New certificate material for new sessions (open ones keep theirs); cookies stay valid.

        Raises ``TlsFileError`` and keeps the current context when OpenSSL refuses it.
        """
        self._context, self.fingerprint = self._build(material)

    def accept(self, datagram: bytes, address: Address) -> Admission:
        """Run the cookie exchange for ``datagram`` from ``address``, which has no session.

        Never raises, keeps nothing unless the outcome is ``ACCEPTED``, and
        sends (through the owner) at most one datagram no bigger than ``datagram``
        before a cookie verifies.
        """
        if not is_client_hello(datagram) or split(datagram) is None:
            return Admission(Outcome.IGNORED)
        stranger = _Stranger(address)
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(stranger)
        connection.set_ciphertext_mtu(self.mtu)
        connection.bio_write(datagram)
        try:
            connection.DTLSv1_listen()
        except SSL.WantReadError:
            return self._challenge(connection, stranger, len(datagram))
        except SSL.Error:
            return Admission(Outcome.IGNORED)
        session = DtlsSession(connection, address, self.owner, self.clock, self.mtu)
        failure = session.begin()
        if failure is not None:
            return Admission(Outcome.REFUSED, reason=failure)
        return Admission(Outcome.ACCEPTED, session)

    def _challenge(
        self, connection: SSL.Connection, stranger: _Stranger, received: int
    ) -> Admission:
        replies = outgoing(connection, self.mtu)
        if len(replies) != 1:
            return Admission(Outcome.IGNORED)
        if len(replies[0]) > received:
            return Admission(Outcome.UNANSWERED)
        self.owner.transmit(replies[0], stranger.address)
        return Admission(Outcome.BAD_COOKIE if stranger.cookie_refused else Outcome.CHALLENGED)

    # OpenSSL's cookie callbacks: an exception here would escape from DTLSv1_listen.

    def _make_cookie(self, connection: SSL.Connection) -> bytes:
        stranger = connection.get_app_data()
        if not isinstance(stranger, _Stranger):
            return b""
        return self.cookies.make(stranger.address)

    def _check_cookie(self, connection: SSL.Connection, cookie: bytes) -> bool:
        stranger = connection.get_app_data()
        if not isinstance(stranger, _Stranger):
            return False
        if self.cookies.valid(stranger.address, cookie):
            return True
        stranger.cookie_refused = True
        return False
