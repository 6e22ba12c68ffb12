"""A development PKI: a local CA, a server certificate and client certificates.

For ``gateway certs`` and ``generate_dev_cert = true``: good enough to run TLS
on a laptop or in CI, not a replacement for a real CA.

Files are never overwritten without ``force``. Private keys are created with
mode 0600 from the start (never loosened and then tightened), certificates 0644.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)

from gateway.tls.pki import PkiError, fingerprint, issue_certificate, make_ca, pem, pem_key

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
_CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED_NAMES = ("ca", "server")

_CA_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

KEY_MODE = 0o600
CERT_MODE = 0o644
DIRECTORY_MODE = 0o700


@dataclass(frozen=True)
class DevPki:
    """What ``make_dev_pki`` did."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None
    client_key: Path | None
    ca_fingerprint: str
    written: tuple[Path, ...]
    """Files created or replaced, in the order written."""
    kept: tuple[Path, ...]
    """Existing files used as they were (a reused CA, a server certificate kept)."""


@dataclass(frozen=True)
class DevCertResult:
    """What ``ensure_dev_server_cert`` generated."""

    cert: Path
    key: Path
    ca_cert: Path
    ca_key: Path
    ca_fingerprint: str
    ca_created: bool


def _write_file(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to a file created with ``mode``; replace it only with ``force``.

    Without ``force`` the file is created with O_EXCL, so an existing file is
    never touched. With ``force`` a new file is written beside it and renamed
    over it, so a key never exists, even briefly, with the old file's mode.
    """
    target = path
    if force:
        target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path} already exists; use --force to replace it") from None
    except OSError as e:
        raise PkiError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if force:
            os.replace(target, path)
    except OSError as e:
        if force:
            with contextlib.suppress(OSError):
                target.unlink()
        raise PkiError(f"cannot write {path}: {e.strerror or e}") from None


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise PkiError(f"cannot create the directory {directory}: {e.strerror or e}") from None


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """Read an existing CA certificate and key, checking they belong together."""
    try:
        cert_data = cert_path.read_bytes()
        key_data = key_path.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read {e.filename}: {e.strerror or e}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        raise PkiError(f"{cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise PkiError(f"{key_path} is encrypted; the dev CA key must not be") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(f"{key_path} is not a PEM private key") from None
    if not isinstance(key, _CA_KEY_TYPES):
        raise PkiError(f"{key_path}: unsupported key type for a CA")
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        raise PkiError(f"{key_path} does not match the certificate in {cert_path}")
    return cert, key


def _public_bytes(public: PublicKeyTypes) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(hosts, str):
        hosts = (hosts,)
    cleaned = tuple(host.strip() for host in hosts)
    if not cleaned or not all(cleaned):
        raise PkiError("at least one host name or IP address is needed")
    return cleaned


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _refuse(path: Path) -> PkiError:
    return PkiError(f"{path} already exists; use --force to replace it")


def make_dev_pki(
    directory: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    client: str | None = None,
    force: bool = False,
) -> DevPki:
    """Write a dev CA, a server certificate and optionally a client certificate.

    Files in ``directory``: ``ca.pem``/``ca.key`` (the CA), ``server.pem``/
    ``server.key`` (for ``hosts``, CN = the first host) and, with ``client``,
    ``<client>.pem``/``<client>.key`` (CN = ``client``, for ``clientAuth``).

    Without ``force`` no existing file is ever replaced, and every check is
    made before anything is written:

    - an existing CA (``ca.pem`` and ``ca.key``) is reused to sign;
    - ``server.pem``/``server.key`` are written when missing; when they exist
      they are kept if a client certificate was asked for (adding a client to
      a directory made earlier), otherwise that is an error;
    - an existing ``<client>.pem``/``<client>.key`` is an error.

    With ``force`` everything is made anew, including the CA, so certificates
    issued by the old CA stop being trusted.
    """
    hosts = _check_hosts(hosts)
    if client is not None and (
        not _CLIENT_NAME_RE.match(client) or client.lower() in _RESERVED_NAMES
    ):
        raise PkiError(
            f"bad client name {client!r}: use letters, digits, . _ - (not 'ca' or 'server')"
        )
    ca_cert_path = directory / CA_CERT_NAME
    ca_key_path = directory / CA_KEY_NAME
    server_cert_path = directory / SERVER_CERT_NAME
    server_key_path = directory / SERVER_KEY_NAME
    client_cert_path = directory / f"{client}.pem" if client is not None else None
    client_key_path = directory / f"{client}.key" if client is not None else None

    reuse_ca = False
    keep_server = False
    if not force:
        ca_present = [p for p in (ca_cert_path, ca_key_path) if _exists(p)]
        server_present = [p for p in (server_cert_path, server_key_path) if _exists(p)]
        if len(ca_present) == 1:
            raise _refuse(ca_present[0])
        reuse_ca = len(ca_present) == 2
        if server_present:
            if not (reuse_ca and client is not None and len(server_present) == 2):
                raise _refuse(server_present[0])
            keep_server = True
        for path in (client_cert_path, client_key_path):
            if path is not None and _exists(path):
                raise _refuse(path)

    written: list[Path] = []
    kept: list[Path] = []
    if reuse_ca:
        ca, ca_key = _load_ca(ca_cert_path, ca_key_path)
        kept += [ca_cert_path, ca_key_path]
    else:
        ca, ca_key = make_ca(f"Gateway dev CA {secrets.token_hex(3)}")
    _make_directory(directory)

    if not reuse_ca:
        _write_file(ca_key_path, pem_key(ca_key), KEY_MODE, force)
        _write_file(ca_cert_path, pem(ca), CERT_MODE, force)
        written += [ca_key_path, ca_cert_path]
    if keep_server:
        kept += [server_cert_path, server_key_path]
    else:
        server, server_key = issue_certificate(ca, ca_key, hosts[0], hosts)
        _write_file(server_key_path, pem_key(server_key), KEY_MODE, force)
        _write_file(server_cert_path, pem(server), CERT_MODE, force)
        written += [server_key_path, server_cert_path]
    if client is not None:
        assert client_cert_path is not None and client_key_path is not None
        client_cert, client_key = issue_certificate(ca, ca_key, client, client=True)
        _write_file(client_key_path, pem_key(client_key), KEY_MODE, force)
        _write_file(client_cert_path, pem(client_cert), CERT_MODE, force)
        written += [client_key_path, client_cert_path]
    return DevPki(
        directory=directory,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=server_cert_path,
        server_key=server_key_path,
        client_cert=client_cert_path,
        client_key=client_key_path,
        ca_fingerprint=fingerprint(ca),
        written=tuple(written),
        kept=tuple(kept),
    )


def ensure_dev_server_cert(
    cert: Path, key: Path, hosts: Sequence[str] = DEFAULT_HOSTS
) -> DevCertResult | None:
    """For ``generate_dev_cert = true``: make a server certificate if there is none.

    Returns None when ``cert`` and ``key`` both exist (nothing is done).
    When neither exists, signs a new server certificate with the dev CA
    ``ca.pem``/``ca.key`` in ``cert``'s folder, creating that CA first if it is
    missing, and writes it to ``cert`` and its key to ``key``. Only one of them
    existing is an error.
    """
    hosts = _check_hosts(hosts)
    cert_exists, key_exists = _exists(cert), _exists(key)
    if cert_exists and key_exists:
        return None
    if cert_exists or key_exists:
        present, missing = (cert, key) if cert_exists else (key, cert)
        raise PkiError(
            f"{present} exists but {missing} does not; "
            "remove it to have both generated, or provide both"
        )
    ca_cert_path = cert.parent / CA_CERT_NAME
    ca_key_path = cert.parent / CA_KEY_NAME
    if cert in (ca_cert_path, ca_key_path) or key in (ca_cert_path, ca_key_path):
        raise PkiError(
            f"the server certificate and key cannot be named {CA_CERT_NAME} or {CA_KEY_NAME}"
        )
    ca_present = [p for p in (ca_cert_path, ca_key_path) if _exists(p)]
    if len(ca_present) == 1:
        missing = ca_key_path if ca_present[0] == ca_cert_path else ca_cert_path
        raise PkiError(
            f"{ca_present[0]} exists but {missing} does not; cannot sign with the dev CA"
        )
    ca_created = not ca_present
    ca_key: CertificateIssuerPrivateKeyTypes
    _make_directory(cert.parent)
    _make_directory(key.parent)
    if ca_created:
        ca, ca_key = make_ca(f"Gateway dev CA {secrets.token_hex(3)}")
        _write_file(ca_key_path, pem_key(ca_key), KEY_MODE, force=False)
        _write_file(ca_cert_path, pem(ca), CERT_MODE, force=False)
    else:
        ca, ca_key = _load_ca(ca_cert_path, ca_key_path)
    server, server_key = issue_certificate(ca, ca_key, hosts[0], hosts)
    _write_file(key, pem_key(server_key), KEY_MODE, force=False)
    _write_file(cert, pem(server), CERT_MODE, force=False)
    return DevCertResult(
        cert=cert,
        key=key,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        ca_fingerprint=fingerprint(ca),
        ca_created=ca_created,
    )
