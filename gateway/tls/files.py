"""TLS material of a listener: its settings, and loading its certificate, key and CA files.

Nothing here imports Twisted: the configuration checks files with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class TlsSettings:
    """Certificate material of a ``tls`` or ``wss`` listener (paths already resolved)."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    min_tls: str = "1.2"
    generate_dev_cert: bool = False


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


def certificates(path: Path, key: str) -> list[x509.Certificate]:
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


def key_pair(
    cert_path: Path, key_path: Path, cert_key: str = "cert", key_key: str = "key"
) -> tuple[list[x509.Certificate], ServerKey]:
    """The certificate chain (leaf first) and its private key, checked to match."""
    chain = certificates(cert_path, cert_key)
    private = _private_key(key_path, key_key)
    if _public_bytes(private.public_key()) != _public_bytes(chain[0].public_key()):
        raise TlsFileError(key_key, f"{key_path} does not match the certificate in {cert_path}")
    return chain, private


@dataclass(frozen=True)
class Material:
    chain: list[x509.Certificate]
    key: ServerKey
    client_cas: list[x509.Certificate] | None


def load_material(settings: TlsSettings) -> Material:
    chain, private = key_pair(settings.cert, settings.key)
    client_cas = None
    if settings.client_ca is not None:
        client_cas = certificates(settings.client_ca, "client_ca")
    return Material(chain, private, client_cas)


def check_tls_files(settings: TlsSettings) -> None:
    """Raise ``TlsFileError`` unless the listener's files load and belong together.

    With ``generate_dev_cert`` and neither ``cert`` nor ``key`` present, the
    pair is not checked: it is generated when the gateway starts.
    """
    if settings.generate_dev_cert and not (settings.cert.exists() or settings.key.exists()):
        if settings.client_ca is not None:
            certificates(settings.client_ca, "client_ca")
        return
    load_material(settings)
