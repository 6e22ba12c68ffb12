"""Server TLS for the ``tls`` and ``wss`` listeners.

``ServerTls`` is a small ``IOpenSSLServerConnectionCreator``: it hands every
new connection the current ``OpenSSL.SSL.Context``, so ``reload()`` swaps
certificates for new connections through public API only (open connections
keep the context they started with). The context comes from Twisted's
``CertificateOptions`` (its cipher defaults), with three additions:

- TLS 1.0 and 1.1 are always refused (``min_tls`` can raise the floor to 1.3);
- TLS 1.2 only with forward-secret AEAD suites (``TLS12_CIPHERS``: ECDHE with
  AES-GCM or ChaCha20-Poly1305, Mozilla's "intermediate" profile without DHE);
  TLS 1.3 suites are all AEAD and forward-secret already;
- renegotiation is refused;
- ALPN: ``http/1.1`` is selected when the client offers it, and a client
  offering only other protocols still connects, with no protocol selected.
  (Twisted's own ALPN callback answers such a client with an internal-error
  alert.) The wrapped factory's ``IProtocolNegotiationFactory`` list is not
  consulted: a ``wss`` listener must not be offered ``h2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from gateway.tls.files import Material, TlsFileError, TlsSettings, load_material
from gateway.tls.pki import fingerprint

MIN_TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
DEFAULT_ALPN = (b"http/1.1",)
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
"""The TLS 1.2 cipher suites a server offers (OpenSSL names), the strongest first."""


# Server


def trust(certificates: Sequence[x509.Certificate]) -> Any:
    """An ``IOpenSSLTrustRoot`` (an interface Twisted does not export publicly)."""
    return trustRootFromCertificates(
        [Certificate(X509.from_cryptography(cert)) for cert in certificates]
    )


# pyOpenSSL names the type of its NO_OVERLAPPING_PROTOCOLS sentinel privately.
_Selected = bytes | SSL._NoOverlappingProtocols


def _select_protocol(
    acceptable: Sequence[bytes],
) -> Callable[[SSL.Connection, list[bytes]], _Selected]:
    def select(connection: SSL.Connection, offered: list[bytes]) -> _Selected:
        for protocol in acceptable:
            if protocol in offered:
                return protocol
        # Go on without ALPN rather than fail the handshake.
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1
"""OpenSSL's ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (openssl/ssl.h; pyOpenSSL exports no name)."""


def use_material(context: SSL.Context, material: Material, what: str) -> None:
    """Give ``context`` the certificate chain and key of ``material``, and name its client
    CAs to clients (so they can pick a certificate); raises ``TlsFileError`` saying
    ``what`` OpenSSL refused."""
    try:
        context.use_certificate(material.chain[0])
        for extra in material.chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(material.key)
        context.check_privatekey()
    except SSL.Error as e:
        raise TlsFileError("cert", f"{what}: OpenSSL refused it: {e}") from None
    for ca in material.client_cas or ():
        context.add_client_ca(ca)


def _context(material: Material, settings: TlsSettings, alpn: Sequence[bytes]) -> SSL.Context:
    options = CertificateOptions(
        raiseMinimumTo=MIN_TLS_VERSIONS[settings.min_tls],
        acceptableProtocols=list(alpn),
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        # trustRoot alone makes a client certificate required (adding
        # requireCertificate=True raises TypeError).
        trustRoot=trust(material.client_cas) if material.client_cas is not None else None,
    )
    context: SSL.Context = options.getContext()
    # The certificate and key go straight to the context as cryptography
    # objects: CertificateOptions takes only pyOpenSSL X509/PKey objects,
    # which pyOpenSSL now deprecates.
    use_material(context, material, str(settings.cert))
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    # One SSL_write encrypts all it is given (pyOpenSSL turns partial writes on, which
    # stops each call after one 16 KiB record): see gateway/tls/through.py.
    context.clear_mode(SSL_MODE_ENABLE_PARTIAL_WRITE)
    context.set_alpn_select_callback(_select_protocol(alpn))
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTls:
    """Server TLS of one listener, reloadable.

    Wrap the listener's factory with
    ``TLSMemoryBIOFactory(server_tls, False, factory, clock)``.
    """

    def __init__(self, settings: TlsSettings, alpn: Sequence[bytes] = DEFAULT_ALPN) -> None:
        """Load the files of ``settings``; raises ``TlsFileError``."""
        self.settings = settings
        self._alpn = tuple(alpn)
        self._context, self.fingerprint = self._build()

    def _build(self) -> tuple[SSL.Context, str]:
        material = load_material(self.settings)
        return _context(material, self.settings, self._alpn), fingerprint(material.chain[0])

    def reload(self) -> None:
        """Re-read certificate, key and client CA; new connections use them.

        Raises ``TlsFileError`` and keeps the current context when anything
        fails to load. ``fingerprint`` is the SHA-256 fingerprint of the
        certificate now served.
        """
        self._context, self.fingerprint = self._build()

    def serverConnectionForTLS(
        self,
        tlsProtocol: TLSMemoryBIOProtocol,
    ) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def peer_subject(transport: object) -> str | None:
    """Who the TLS peer's certificate names (``certificate_subject``).

    None when ``transport`` is not TLS or the peer sent no certificate.
    """
    tls = ISSLTransport(transport, None)
    if tls is None:
        return None
    peer = tls.getPeerCertificate()
    if isinstance(peer, X509):
        return certificate_subject(peer.to_cryptography())
    if isinstance(peer, x509.Certificate):
        return certificate_subject(peer)
    return None


def certificate_subject(cert: x509.Certificate) -> str | None:
    """The subject CN of a client certificate, else its first subject alternative name,
    else None: what a peer id shows after its listener's name (``tls-3:alice``)."""
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in names:
        return str(name.value)
    return None
