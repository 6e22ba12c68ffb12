"""The DTLS server profile: one ``OpenSSL.SSL.Context`` per listener, shared by its sessions.

The same profile as the ``tls`` listener's TLS 1.2 (``gateway.tls.server``):

- DTLS 1.2 only (DTLS 1.0 is refused; DTLS 1.3 is not offered by OpenSSL);
- ECDHE with AES-GCM or ChaCha20-Poly1305 (``TLS12_CIPHERS``), server's order;
- no renegotiation, no compression, no session resumption (no cache, no
  tickets): every session makes a full handshake after its cookie;
- with client CAs, a client certificate that chains to one of them is required.

And what DTLS adds: the cookie exchange (``OP_COOKIE_EXCHANGE`` with the
listener's cookie callbacks), and ``OP_NO_QUERY_MTU``: a memory BIO knows no
path MTU, so each connection is given one (``set_ciphertext_mtu``).
"""

from __future__ import annotations

from collections.abc import Callable

from OpenSSL import SSL
from OpenSSL.crypto import X509

from gateway.tls.files import Material
from gateway.tls.server import TLS12_CIPHERS, use_material

DTLS1_2_VERSION = 0xFEFD
"""OpenSSL's DTLS1_2_VERSION (pyOpenSSL names only the TLS versions)."""

_OPTIONS = (
    SSL.OP_NO_QUERY_MTU
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_TICKET
    | SSL.OP_CIPHER_SERVER_PREFERENCE
)

MakeCookie = Callable[[SSL.Connection], bytes]
CheckCookie = Callable[[SSL.Connection, bytes], bool]


def server_context(
    material: Material, make_cookie: MakeCookie, check_cookie: CheckCookie
) -> SSL.Context:
    """A DTLS 1.2 server context for ``material``; raises ``TlsFileError`` when OpenSSL refuses it.

    ``make_cookie`` and ``check_cookie`` are OpenSSL's cookie callbacks: they
    are called with the connection, whose app data tells the source.
    """
    if SSL.OP_COOKIE_EXCHANGE is None:
        raise NotImplementedError("this OpenSSL has no DTLS cookie exchange")
    context = SSL.Context(SSL.DTLS_SERVER_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    context.set_options(_OPTIONS | SSL.OP_COOKIE_EXCHANGE)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    use_material(context, material, "the certificate or key")
    if material.client_cas is not None:
        store = context.get_cert_store()
        assert store is not None  # a new context always has one
        for ca in material.client_cas:
            store.add_cert(X509.from_cryptography(ca))
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    context.set_cookie_generate_callback(make_cookie)
    context.set_cookie_verify_callback(check_cookie)
    return context
