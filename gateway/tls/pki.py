"""Certificate building blocks: keys, a CA, certificates it issues, PEM and fingerprints.

Everything is made with ``cryptography`` (no ``openssl`` binary), with EC
P-256 keys. ``gateway.tls.devcerts`` builds the development PKI from these;
tests use them to make expired certificates and rogue CAs.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
# The longest validity Apple and browsers accept for a TLS server certificate.
LEAF_VALIDITY = datetime.timedelta(days=825)
# Certificates start a little in the past so a peer whose clock is behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)


class PkiError(Exception):
    """A problem making certificates; ``str()`` is one line for the user."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _name(common_name: str | None) -> x509.Name:
    if common_name is None:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(
    common_name: str = "Gateway dev CA",
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key (valid 10 years by default)."""
    key = new_key()
    start = not_before if not_before is not None else _now() - CLOCK_SKEW
    end = not_after if not_after is not None else start + CA_VALIDITY
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    common_name: str | None,
    hosts: Sequence[str] = (),
    client: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by ``ca`` and its new key.

    ``hosts`` become subject alternative names (IP addresses as IP SANs, the
    rest as DNS names). A server certificate (the default) is for
    ``serverAuth``; ``client=True`` makes a ``clientAuth`` certificate.
    ``common_name=None`` leaves the subject empty (then ``hosts`` is required).
    Validity is 825 days from five minutes ago unless given.
    """
    if common_name is None and not hosts:
        raise PkiError("a certificate without a common name needs at least one host")
    key = new_key()
    start = not_before if not_before is not None else _now() - CLOCK_SKEW
    end = not_after if not_after is not None else start + LEAF_VALIDITY
    public = key.public_key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        # An empty subject makes the SAN extension critical (RFC 5280 4.2.1.6).
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]),
            critical=common_name is None,
        )
    return builder.sign(ca_key, _signature_hash(ca_key)), key


def pem(cert: x509.Certificate) -> bytes:
    """``cert`` in PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """``key`` in unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as ``openssl x509 -fingerprint -sha256`` shows it (AB:CD:...)."""
    return ":".join(f"{byte:02X}" for byte in cert.fingerprint(hashes.SHA256()))


def sha256_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate in ``cert_pem``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PkiError("not a PEM certificate") from None
    return fingerprint(cert)
