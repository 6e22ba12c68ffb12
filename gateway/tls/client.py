"""Client TLS, for ``gateway client tls://`` and ``wss://``."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.ssl import (
    optionsForClientTLS,
    platformTrust,
)

from gateway.tls.files import TlsFileError, certificates, key_pair
from gateway.tls.server import trust


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
    roots = trust(certificates(ca, "ca")) if ca is not None else platformTrust()
    extra: dict[str, object] = {}
    if cert is not None and key is not None:
        chain, private = key_pair(cert, key)
        # What clientCertificate= would pass on, but as cryptography objects
        # (pyOpenSSL deprecates its X509/PKey objects); Twisted hands them to
        # the context unchanged.
        extra = {"certificate": chain[0], "privateKey": private, "extraCertChain": chain[1:]}
    creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
        hostname, trustRoot=roots, extraCertificateOptions=extra
    )
    return creator
