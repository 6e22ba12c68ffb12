"""TLS for the ``tls`` and ``wss`` listeners, and for ``gateway client``.

``ServerTls`` is a small ``IOpenSSLServerConnectionCreator``: it hands every
new connection the current ``OpenSSL.SSL.Context``, so ``reload()`` swaps
certificates for new connections through public API only (open connections
keep the context they started with). The context comes from Twisted's
``CertificateOptions`` (its cipher defaults), with three additions:

- TLS 1.0 and 1.1 are always refused (``min_tls`` can raise the floor to 1.3);
- renegotiation is refused;
- ALPN: ``http/1.1`` is selected when the client offers it, and a client
  offering only other protocols still connects, with no protocol selected.
  (Twisted's own ALPN callback answers such a client with an internal-error
  alert.) The wrapped factory's ``IProtocolNegotiationFactory`` list is not
  consulted: a ``wss`` listener must not be offered ``h2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from gateway.config import TlsSettings
from gateway.pki import fingerprint

MIN_TLS_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
DEFAULT_ALPN = (b"http/1.1",)

_SERVER_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
ServerKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used.

    ``key`` names the setting: ``"cert"``, ``"key"`` or ``"client_ca"`` (and
    ``"ca"`` for ``client_options``); ``problem`` is one line for the user.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(problem)


# Reading files


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsFileError(key, f"cannot read {path}: {e.strerror or e}") from None


def _certificates(path: Path, key: str) -> list[x509.Certificate]:
    """All certificates of a PEM file, in order; at least one."""
    data = _read(path, key)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TlsFileError(key, f"{path}: not a PEM certificate")
    return certificates


def _private_key(path: Path, key: str = "key") -> ServerKey:
    data = _read(path, key)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(
            key, f"{path}: the key is encrypted; the gateway needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError(key, f"{path}: not a PEM private key") from None
    if not isinstance(private, _SERVER_KEY_TYPES):
        raise TlsFileError(key, f"{path}: unsupported key type {type(private).__name__}")
    return private


def _public_bytes(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pair(
    cert_path: Path, key_path: Path, cert_key: str = "cert", key_key: str = "key"
) -> tuple[list[x509.Certificate], ServerKey]:
    """The certificate chain (leaf first) and its private key, checked to match."""
    chain = _certificates(cert_path, cert_key)
    private = _private_key(key_path, key_key)
    if _public_bytes(private.public_key()) != _public_bytes(chain[0].public_key()):
        raise TlsFileError(key_key, f"{key_path} does not match the certificate in {cert_path}")
    return chain, private


@dataclass(frozen=True)
class _Material:
    chain: list[x509.Certificate]
    key: ServerKey
    client_cas: list[x509.Certificate] | None


def _load(settings: TlsSettings) -> _Material:
    chain, private = _key_pair(settings.cert, settings.key)
    client_cas = None
    if settings.client_ca is not None:
        client_cas = _certificates(settings.client_ca, "client_ca")
    return _Material(chain, private, client_cas)


def check_tls_files(settings: TlsSettings) -> None:
    """Raise ``TlsFileError`` unless the listener's files load and belong together.

    With ``generate_dev_cert`` and neither ``cert`` nor ``key`` present, the
    pair is not checked: it is generated when the gateway starts.
    """
    if settings.generate_dev_cert and not (settings.cert.exists() or settings.key.exists()):
        if settings.client_ca is not None:
            _certificates(settings.client_ca, "client_ca")
        return
    _load(settings)


# Server


def _trust(certificates: Sequence[x509.Certificate]) -> Any:
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


def _context(material: _Material, settings: TlsSettings, alpn: Sequence[bytes]) -> SSL.Context:
    options = CertificateOptions(
        raiseMinimumTo=MIN_TLS_VERSIONS[settings.min_tls],
        acceptableProtocols=list(alpn),
        # trustRoot alone makes a client certificate required (adding
        # requireCertificate=True raises TypeError).
        trustRoot=_trust(material.client_cas) if material.client_cas is not None else None,
    )
    context: SSL.Context = options.getContext()
    # The certificate and key go straight to the context as cryptography
    # objects: CertificateOptions takes only pyOpenSSL X509/PKey objects,
    # which pyOpenSSL now deprecates.
    try:
        context.use_certificate(material.chain[0])
        for extra in material.chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(material.key)
        context.check_privatekey()
    except SSL.Error as e:
        raise TlsFileError("cert", f"{settings.cert}: OpenSSL refused it: {e}") from None
    for ca in material.client_cas or ():
        # Tells clients which CAs are accepted, so they can pick a certificate.
        context.add_client_ca(ca)
    context.set_options(SSL.OP_NO_RENEGOTIATION)
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
        material = _load(self.settings)
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
    """Who the TLS peer's certificate names: its subject CN, else its first SAN.

    None when ``transport`` is not TLS or the peer sent no certificate.
    """
    tls = ISSLTransport(transport, None)
    if tls is None:
        return None
    peer = tls.getPeerCertificate()
    if isinstance(peer, X509):
        cert = peer.to_cryptography()
    elif isinstance(peer, x509.Certificate):
        cert = peer
    else:
        return None
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


# Client


def client_options(
    hostname: str, ca: Path | None, cert: Path | None, key: Path | None
) -> IOpenSSLClientConnectionCreator:
    """Client TLS for ``gateway client tls://HOST:PORT``.

    The server must present a certificate for ``hostname`` (a name or an IP
    address) issued by ``ca``, or by the platform's trusted CAs when ``ca``
    is None. ``cert`` and ``key`` (both or neither) are the client certificate
    for mutual TLS. Raises ``TlsFileError`` (``key`` is "ca", "cert" or "key").
    """
    if (cert is None) != (key is None):
        missing = "key" if key is None else "cert"
        raise TlsFileError(missing, "a client certificate needs both --cert and --key")
    trust = _trust(_certificates(ca, "ca")) if ca is not None else platformTrust()
    extra: dict[str, object] = {}
    if cert is not None and key is not None:
        chain, private = _key_pair(cert, key)
        # What clientCertificate= would pass on, but as cryptography objects
        # (pyOpenSSL deprecates its X509/PKey objects); Twisted hands them to
        # the context unchanged.
        extra = {"certificate": chain[0], "privateKey": private, "extraCertChain": chain[1:]}
    creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
        hostname, trustRoot=trust, extraCertificateOptions=extra
    )
    return creator
