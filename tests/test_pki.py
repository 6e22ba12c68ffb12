"""The development PKI: files, modes, reuse and refusal to overwrite."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.tls.devcerts import ensure_dev_server_cert, make_dev_pki
from gateway.tls.pki import PkiError, issue_certificate, make_ca, pem, sha256_fingerprint

OPENSSL = Path("/usr/bin/openssl")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def common_name(cert: x509.Certificate) -> str:
    (attribute,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_make_dev_pki_writes_the_files_with_safe_modes(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    result = make_dev_pki(directory)
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.pem",
    ]
    assert mode(directory) == 0o700 & ~umask()
    for key in ("ca.key", "server.key"):
        assert mode(directory / key) == 0o600
    for cert in ("ca.pem", "server.pem"):
        assert mode(directory / cert) == 0o644 & ~umask()
    assert result.server_cert == directory / "server.pem"
    assert result.client_cert is None
    assert set(result.written) == set(directory.iterdir())
    assert result.kept == ()


def test_server_certificate_covers_the_hosts_and_verifies(tmp_path: Path) -> None:
    result = make_dev_pki(tmp_path, hosts=("gw.example", "localhost", "127.0.0.1", "::1"))
    server, ca = load(result.server_cert), load(result.ca_cert)
    assert common_name(server) == "gw.example"
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gw.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    verifier.verify(server, [])
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=825)
    ca_lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert ca_lifetime >= datetime.timedelta(days=3650)
    assert result.ca_fingerprint == sha256_fingerprint(result.ca_cert.read_bytes())


def test_existing_files_are_not_overwritten_without_force(tmp_path: Path) -> None:
    make_dev_pki(tmp_path)
    before = contents(tmp_path)
    with pytest.raises(PkiError, match=r"server\.pem already exists; use --force to replace it"):
        make_dev_pki(tmp_path)
    assert contents(tmp_path) == before


def test_force_replaces_everything_with_fresh_modes(tmp_path: Path) -> None:
    make_dev_pki(tmp_path)
    before = contents(tmp_path)
    (tmp_path / "server.key").chmod(0o644)
    make_dev_pki(tmp_path, force=True)
    after = contents(tmp_path)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    # The replaced key did not inherit the old file's mode.
    assert mode(tmp_path / "server.key") == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_client_certificate(tmp_path: Path) -> None:
    result = make_dev_pki(tmp_path, client="alice")
    assert result.client_cert == tmp_path / "alice.pem"
    assert result.client_key == tmp_path / "alice.key"
    assert mode(tmp_path / "alice.key") == 0o600
    client = load(tmp_path / "alice.pem")
    assert common_name(client) == "alice"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    client.verify_directly_issued_by(load(tmp_path / "ca.pem"))


def test_adding_a_client_to_an_existing_directory_reuses_the_ca(tmp_path: Path) -> None:
    make_dev_pki(tmp_path)
    before = contents(tmp_path)
    result = make_dev_pki(tmp_path, client="bob")
    after = contents(tmp_path)
    assert {name: after[name] for name in before} == before
    assert set(result.written) == {tmp_path / "bob.pem", tmp_path / "bob.key"}
    assert result.kept == (
        tmp_path / "ca.pem",
        tmp_path / "ca.key",
        tmp_path / "server.pem",
        tmp_path / "server.key",
    )
    load(tmp_path / "bob.pem").verify_directly_issued_by(load(tmp_path / "ca.pem"))


def test_an_existing_ca_alone_signs_the_new_server_certificate(tmp_path: Path) -> None:
    first = make_dev_pki(tmp_path)
    (tmp_path / "server.pem").unlink()
    (tmp_path / "server.key").unlink()
    second = make_dev_pki(tmp_path)
    assert second.ca_fingerprint == first.ca_fingerprint
    load(tmp_path / "server.pem").verify_directly_issued_by(load(tmp_path / "ca.pem"))


def test_an_existing_client_is_not_replaced(tmp_path: Path) -> None:
    make_dev_pki(tmp_path, client="alice")
    before = contents(tmp_path)
    with pytest.raises(PkiError, match=r"alice\.pem already exists; use --force"):
        make_dev_pki(tmp_path, client="alice")
    assert contents(tmp_path) == before


def test_half_a_ca_is_refused_before_writing_anything(tmp_path: Path) -> None:
    make_dev_pki(tmp_path)
    for name in ("ca.key", "server.pem", "server.key"):
        (tmp_path / name).unlink()
    with pytest.raises(PkiError, match=r"ca\.pem already exists"):
        make_dev_pki(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ca.pem"]


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "ca", "server", "-x"])
def test_bad_client_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PkiError, match="bad client name"):
        make_dev_pki(tmp_path / "certs", client=name)
    assert not (tmp_path / "certs").exists()


def test_ensure_dev_server_cert_generates_once(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key"
    result = ensure_dev_server_cert(cert, key)
    assert result is not None
    assert result.ca_created
    assert result.ca_cert == tmp_path / "tls" / "ca.pem"
    assert mode(key) == 0o600
    assert mode(result.ca_key) == 0o600
    load(cert).verify_directly_issued_by(load(result.ca_cert))
    assert result.ca_fingerprint == sha256_fingerprint(result.ca_cert.read_bytes())
    before = contents(tmp_path / "tls")
    assert ensure_dev_server_cert(cert, key) is None
    assert contents(tmp_path / "tls") == before


def test_ensure_dev_server_cert_reuses_the_dev_ca(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    result = ensure_dev_server_cert(tmp_path / "other.pem", tmp_path / "keys" / "other.key")
    assert result is not None
    assert not result.ca_created
    assert result.ca_fingerprint == pki.ca_fingerprint
    load(tmp_path / "other.pem").verify_directly_issued_by(load(pki.ca_cert))


def test_ensure_dev_server_cert_refuses_half_a_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"something")
    with pytest.raises(PkiError, match=r"server\.pem exists but .*server\.key does not"):
        ensure_dev_server_cert(cert, key)
    assert not key.exists()
    assert cert.read_bytes() == b"something"


def test_fingerprint_matches_openssl(tmp_path: Path) -> None:
    if not OPENSSL.exists():
        pytest.skip("no openssl binary")
    result = make_dev_pki(tmp_path)
    output = subprocess.run(
        [OPENSSL, "x509", "-noout", "-fingerprint", "-sha256", "-in", result.ca_cert],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    # "sha256 Fingerprint=AB:CD:..." (the prefix's case varies by version)
    assert output.strip().split("=", 1)[1] == result.ca_fingerprint
    assert result.ca_fingerprint.count(":") == 31


def test_helpers_make_expired_certificates_and_rogue_cas() -> None:
    ca, ca_key = make_ca("Test CA")
    rogue, _ = make_ca("Test CA")
    now = datetime.datetime.now(datetime.UTC)
    cert, _ = issue_certificate(
        ca,
        ca_key,
        "old",
        client=True,
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    assert cert.not_valid_after_utc < now
    cert.verify_directly_issued_by(ca)
    with pytest.raises(Exception):  # noqa: B017 (any signature failure will do)
        cert.verify_directly_issued_by(rogue)
    assert pem(cert).startswith(b"-----BEGIN CERTIFICATE-----")


def test_sha256_fingerprint_refuses_garbage() -> None:
    with pytest.raises(PkiError, match="not a PEM certificate"):
        sha256_fingerprint(b"nothing here")
