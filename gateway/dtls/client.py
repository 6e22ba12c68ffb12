"""The client side of DTLS 1.2, sans I/O: ``gateway client dtls://`` and the bench's subscribers.

- ``client_context``: what the sessions of one client share: DTLS 1.2 only,
  the server profile's cipher suites (``TLS12_CIPHERS``: ECDHE with AES-GCM or
  ChaCha20-Poly1305), no renegotiation, compression or tickets, the server's
  certificate checked against the given CAs (else the platform's), and an
  optional client certificate for mutual DTLS.
- ``DtlsClient``: one session to one server. It checks that the server's
  certificate is for the expected host name or IP address (service_identity,
  inside OpenSSL's verification, so a wrong name fails the handshake with an
  alert exactly as an unknown CA does), then runs on a ``DtlsSession``: the
  very record handling, close_notify and retransmission on the injected clock
  of the server's sessions, from the other end of the handshake.

Nothing here opens a socket: the owner is handed every datagram to send (each
at most the MTU, whole records) and the datagrams received are handed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from gateway.dtls.context import DTLS1_2_VERSION
from gateway.dtls.cookies import Address
from gateway.dtls.server import DEFAULT_MTU, MAX_MTU, MIN_MTU
from gateway.dtls.session import DtlsSession
from gateway.tls.files import Material, ServerKey, TlsFileError, certificates, key_pair
from gateway.tls.server import TLS12_CIPHERS, use_material

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

CLOSED = "closed by the client"

_OPTIONS = (
    SSL.OP_NO_QUERY_MTU  # a memory BIO knows no path MTU: each connection is given one
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_TICKET
)

# What OpenSSL's verification error numbers are called (X509_V_ERR_...), for messages.
_VERIFY_ERRORS = {
    value: name.removeprefix("ERR_").lower().replace("_", " ")
    for name, value in vars(SSL.X509VerificationCodes).items()
    if name.startswith("ERR_") and isinstance(value, int)
}

ClientCertificate = tuple[list[x509.Certificate], ServerKey]
"""A client certificate chain (leaf first) and its private key."""


def client_files(
    ca: Path | None, cert: Path | None, key: Path | None
) -> tuple[list[x509.Certificate] | None, ClientCertificate | None]:
    """The CAs to trust (None: the platform's) and the client certificate of ``--ca``,
    ``--cert`` and ``--key`` (both or neither), as ``gateway.tls.client`` reads them for tls.

    Raises ``TlsFileError`` (``key`` is "ca", "cert" or "key").
    """
    if (cert is None) != (key is None):
        missing = "key" if key is None else "cert"
        raise TlsFileError(missing, "a client certificate needs both --cert and --key")
    trust = certificates(ca, "ca") if ca is not None else None
    pair = key_pair(cert, key) if cert is not None and key is not None else None
    return trust, pair


def client_context(
    trust: Sequence[x509.Certificate] | None, certificate: ClientCertificate | None = None
) -> SSL.Context:
    """A DTLS 1.2 client context that trusts ``trust`` (None: the platform's CAs).

    ``certificate`` is sent when the server asks for one (mutual DTLS). Raises
    ``TlsFileError`` when OpenSSL refuses the certificate or key.
    """
    context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_options(_OPTIONS)
    if trust is None:
        context.set_default_verify_paths()
    else:
        store = context.get_cert_store()
        assert store is not None  # a new context always has one
        for ca in trust:
            store.add_cert(X509.from_cryptography(ca))
    # Each connection adds its own callback: the name its server's certificate must show.
    context.set_verify(SSL.VERIFY_PEER)
    if certificate is not None:
        chain, key = certificate
        use_material(context, Material(chain, key, None), "the client certificate")
    return context


class ClientOwner(Protocol):
    """Who a ``DtlsClient`` reports to: the socket side of the client."""

    def transmit(self, datagram: bytes) -> None:
        """Send ``datagram`` (at most the MTU) to the server as one UDP datagram."""

    def handshake_completed(self) -> None:
        """The server is verified and the handshake done: ``send`` works from now on."""

    def session_ended(self, reason: str) -> None:
        """The session ended (once; ``close`` included): ``reason`` says why."""


class _ServerCheck:
    """OpenSSL's verify callback for one connection: the chain, then the name on the leaf."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.ip = _ip(hostname)
        self.problem: str | None = None

    def __call__(
        self, connection: SSL.Connection, cert: X509, error: int, depth: int, ok: int
    ) -> bool:
        # An exception here would escape from do_handshake: none may.
        if not ok:
            reason = _VERIFY_ERRORS.get(error, f"verify error {error}")
            self.problem = f"the server's certificate is not trusted ({reason})"
            return False
        if depth > 0:
            return True
        leaf = cert.to_cryptography()
        try:
            if self.ip is None:
                verify_certificate_hostname(leaf, self.hostname)
            else:
                verify_certificate_ip_address(leaf, self.ip)
        except (VerificationError, CertificateError):
            self.problem = (
                f"the server's certificate is not valid for {self.hostname!r} (hostname mismatch)"
            )
            return False
        return True


class _Relay:
    """The session's ``SessionOwner``: passes what it is told on to the client's owner.

    A session that failed its handshake on our verification is reported with
    the problem found (OpenSSL says only "certificate verify failed").
    """

    def __init__(self, owner: ClientOwner, check: _ServerCheck) -> None:
        self.owner = owner
        self.check = check
        self.end_reason: str | None = None

    def transmit(self, datagram: bytes, address: Address) -> None:
        self.owner.transmit(datagram)

    def handshake_completed(self, session: DtlsSession) -> None:
        self.owner.handshake_completed()

    def session_ended(self, session: DtlsSession, reason: str) -> None:
        if self.end_reason is not None:
            return
        if not session.handshake_done and self.check.problem is not None:
            reason = f"handshake failed: {self.check.problem}"
        self.end_reason = reason
        self.owner.session_ended(reason)


class DtlsClient:
    """One DTLS 1.2 session to a server, from its first ClientHello to its end.

    ``hostname`` is what the server's certificate must name (a host name, also
    sent as SNI, or an IP address). ``owner`` is handed every datagram to send
    and told of the handshake and of the end; ``clock`` runs the
    retransmission timers; ``mtu`` bounds every datagram sent (so every record).
    """

    def __init__(
        self,
        context: SSL.Context,
        hostname: str,
        owner: ClientOwner,
        clock: IReactorTime,
        *,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        """Raises ValueError for an ``mtu`` OpenSSL cannot use."""
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu must be from {MIN_MTU} to {MAX_MTU} bytes, not {mtu}")
        self.hostname = hostname
        check = _ServerCheck(hostname)
        self._relay = _Relay(owner, check)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        connection.set_ciphertext_mtu(mtu)
        connection.set_verify(SSL.VERIFY_PEER, check)
        if check.ip is None:
            connection.set_tlsext_host_name(hostname.encode("idna"))
        # The session's address is only a label: all a client sends goes to its one server.
        server: Address = (hostname, 0)
        self._session = DtlsSession(connection, server, self._relay, clock, mtu)
        self._started = False

    # State

    @property
    def handshake_done(self) -> bool:
        """Whether the server is verified and messages may be sent."""
        return self._session.handshake_done

    @property
    def ended(self) -> bool:
        return self._session.ended

    @property
    def end_reason(self) -> str | None:
        """Why the session ended, e.g. ``handshake failed: ... (hostname mismatch)``."""
        return self._relay.end_reason

    @property
    def max_message_bytes(self) -> int:
        """The largest message ``send`` takes (0 until the handshake is done)."""
        return self._session.max_message_bytes

    @property
    def server_subject(self) -> str | None:
        """Who the server's certificate names (its CN, else its first alternative name)."""
        return self._session.subject

    @property
    def retransmissions(self) -> int:
        """How many times a lost flight was sent again."""
        return self._session.retransmissions

    @property
    def discarded(self) -> int:
        """Datagrams dropped as not whole DTLS records."""
        return self._session.discarded

    # Use

    def start(self) -> None:
        """Send the ClientHello (the cookie exchange and the handshake follow in ``receive``)."""
        if self._started:
            raise RuntimeError("a DtlsClient starts once")
        self._started = True
        failure = self._session.begin()
        if failure is not None:  # a failure inside begin() reaches no owner
            self._relay.session_ended(self._session, failure)

    def receive(self, datagram: bytes) -> list[bytes]:
        """The application messages in ``datagram`` (one per record), after the rest is handled:
        handshake records move the handshake on, a close_notify is answered and ends the
        session, anything broken, replayed or forged gives nothing."""
        return self._session.receive(datagram)

    def send(self, message: bytes) -> bool:
        """Send ``message`` as one record in one datagram; False, and nothing sent, unless it
        fits (not empty, at most ``max_message_bytes``, after the handshake, before the end)."""
        return self._session.send(message)

    def send_all(self, messages: list[bytes]) -> int:
        """Send each message as one record, packed into few datagrams; how many did not fit."""
        return self._session.send_all(messages)

    def close(self, reason: str = CLOSED) -> None:
        """End the session: a close_notify once the handshake is done, then ``session_ended``."""
        self._session.close(reason)


def _ip(hostname: str) -> str | None:
    """``hostname`` as an IP address, or None when it is a name."""
    try:
        return str(ip_address(hostname))
    except ValueError:
        return None
