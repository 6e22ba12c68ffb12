"""TLS listeners against the real gateway command, with the real ``openssl s_client``."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.tls.pki import issue_certificate, make_ca, pem, pem_key
from tests.conftest import GATEWAY, TIMEOUT, Datagram, GatewayProcess, Interactive, Line, make_certs
from tests.toml import TomlValue, toml_listener, toml_table

OPENSSL = shutil.which("openssl") or "openssl"


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A dev PKI made by the real ``gateway certs`` command, with a client 'alice'."""
    folder = tmp_path / "certs"
    assert "dev CA SHA-256 fingerprint" in make_certs(folder, "--client", "alice")
    for key in ("ca.key", "server.key", "alice.key"):
        assert (folder / key).stat().st_mode & 0o777 == 0o600
    return folder


def config(certs: Path, mtls: bool, **extra_limits: TomlValue) -> str:
    client_ca = certs / "ca.pem" if mtls else None
    return (
        toml_table("limits", handshake_timeout=1.0, **extra_limits)
        + toml_listener("tls", certs=certs, client_ca=client_ca, welcome="welcome {peer}")
        + toml_listener("tcp")
        + toml_listener("udp")
    )


@pytest.fixture
def gw(run_gateway, certs: Path) -> GatewayProcess:
    """A gateway with its TLS listener (no client certificates asked), a tcp and a udp one."""
    gateway: GatewayProcess = run_gateway(config(certs, mtls=False))
    return gateway


def s_client(port: int, certs: Path, *extra: str) -> list[str]:
    return [
        OPENSSL,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(certs / "ca.pem"),
        "-verify_return_error",
        *extra,
    ]


def refused(gw: GatewayProcess, argv: list[str], tcp: Line) -> str:
    """Run s_client that should be refused; prove nothing it sent reached a TCP peer."""
    failures = sum(1 for line in gw.log if "failed the handshake" in line)
    # -ign_eof: keep reading after sending, so the server's verdict is seen.
    result = subprocess.run(
        [*argv, "-ign_eof"], input=b"must not pass\n", capture_output=True, timeout=TIMEOUT
    )
    gw.wait_count("failed the handshake", failures + 1)
    assert tcp.nothing_within(0.3)
    return (result.stdout + result.stderr).decode(errors="replace")


def test_s_client_verifies_the_server_and_talks_to_tcp_and_udp_peers(gw, certs):
    tcp = Line(gw.ports["tcp"])
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    session = Interactive(s_client(gw.ports["tls"], certs))
    out = session.wait_for(b"welcome tls-1")
    assert b"Verify return code: 0 (ok)" in out
    assert re.search(rb"Cipher is (?!\(NONE\))", out)
    session.send(b"from s_client")
    assert tcp.line() == b"from s_client"
    assert udp.recv() == b"from s_client\n"
    tcp.send(b"from tcp\n")
    session.wait_for(b"from tcp\n")
    udp.send(b"from udp")
    session.wait_for(b"from udp\n")
    session.finish()


def test_s_client_offering_alpn_connects(gw, certs):
    tcp = Line(gw.ports["tcp"])
    session = Interactive(s_client(gw.ports["tls"], certs, "-alpn", "http/1.1"))
    session.wait_for(b"welcome tls-1")
    session.send(b"with alpn")
    assert tcp.line() == b"with alpn"
    assert b"ALPN protocol: http/1.1" in session.finish()


def test_tls_1_1_is_refused_by_the_server(gw, certs):
    tcp = Line(gw.ports["tcp"])
    # SECLEVEL=0 makes the client willing, so the refusal is the server's.
    out = refused(
        gw, s_client(gw.ports["tls"], certs, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"), tcp
    )
    assert "Cipher is (NONE)" in out or "alert protocol version" in out


@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256"]
)
def test_tls_1_2_without_forward_secret_aead_is_refused(gw, certs, cipher):
    """CBC suites (LUCKY13) and static-RSA key exchange are not offered."""
    out = refused(
        gw, s_client(gw.ports["tls"], certs, "-tls1_2", "-cipher", cipher), Line(gw.ports["tcp"])
    )
    assert "Cipher is (NONE)" in out or "handshake failure" in out


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (["-tls1_2"], "ECDHE-ECDSA-(AES128-GCM-SHA256|AES256-GCM-SHA384|CHACHA20-POLY1305)"),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"], "ECDHE-ECDSA-CHACHA20-POLY1305"),
        (["-tls1_3"], "TLS_AES_256_GCM_SHA384"),
    ],
)
def test_tls_offers_forward_secret_aead_suites(gw, certs, version, expected):
    session = Interactive(s_client(gw.ports["tls"], certs, *version))
    out = session.wait_for(b"welcome tls-1")
    assert re.search(f"Cipher is {expected}\n".encode(), out), out
    session.finish()


TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")


@pytest.mark.timeout(180)
@pytest.mark.skipif(
    TESTSSL is None, reason="testssl.sh is not installed (scripts/bootstrap.sh test)"
)
def test_testssl_finds_nothing_of_severity_low_or_above(gw, tmp_path):
    """Protocols, cipher lists and known vulnerabilities, as testssl.sh sees them (without
    the profile it reports cipherlist_AVERAGE and LUCKY13: the CBC suites)."""
    report = tmp_path / "testssl.json"
    assert TESTSSL is not None
    subprocess.run(
        [
            TESTSSL,
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--severity",
            "LOW",
            "--jsonfile",
            str(report),
            "-p",
            "-s",
            "-U",
            f"127.0.0.1:{gw.ports['tls']}",
        ],
        capture_output=True,
        timeout=170,
    )
    findings = [
        f"{e['id']} {e['severity']}: {e['finding']}"
        for e in json.loads(report.read_text())
        if e.get("severity") in ("LOW", "MEDIUM", "HIGH", "CRITICAL")
    ]
    assert findings == []


def _write_cert(folder: Path, name: str, cert: x509.Certificate, key: object) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(pem(cert))
    key_path.write_bytes(pem_key(key))  # type: ignore[arg-type]
    key_path.chmod(0o600)
    return cert_path, key_path


def _load_ca(certs: Path) -> tuple[x509.Certificate, object]:
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    return ca, ca_key


def test_mutual_tls_refuses_missing_rogue_and_expired_certificates(run_gateway, certs, tmp_path):
    gw = run_gateway(config(certs, mtls=True))
    tcp = Line(gw.ports["tcp"])
    port = gw.ports["tls"]

    out = refused(gw, s_client(port, certs), tcp)
    assert "alert" in out

    rogue_ca, rogue_key = make_ca("Rogue CA")
    rogue_cert, rogue_cert_key = issue_certificate(rogue_ca, rogue_key, "mallory", client=True)
    cert, key = _write_cert(tmp_path, "mallory", rogue_cert, rogue_cert_key)
    out = refused(gw, s_client(port, certs, "-cert", str(cert), "-key", str(key)), tcp)
    assert "alert" in out

    ca, ca_key = _load_ca(certs)
    now = datetime.datetime.now(datetime.UTC)
    expired, expired_key = issue_certificate(
        ca,
        ca_key,  # type: ignore[arg-type]
        "old",
        client=True,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    cert, key = _write_cert(tmp_path, "old", expired, expired_key)
    out = refused(gw, s_client(port, certs, "-cert", str(cert), "-key", str(key)), tcp)
    assert "alert" in out
    assert "tls-" not in "\n".join(line for line in gw.log if "connected from" in line)


def test_mutual_tls_with_a_good_certificate_carries_the_subject(run_gateway, certs):
    gw = run_gateway(config(certs, mtls=True))
    tcp = Line(gw.ports["tcp"])
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    session = Interactive(
        s_client(
            gw.ports["tls"],
            certs,
            "-alpn",
            "http/1.1",
            "-cert",
            str(certs / "alice.pem"),
            "-key",
            str(certs / "alice.key"),
        )
    )
    session.wait_for(b"welcome tls-1:alice")
    gw.wait_for(r"tls-1:alice connected from 127\.0\.0\.1:")
    session.send(b"signed by alice")
    assert tcp.line() == b"signed by alice"
    assert udp.recv() == b"signed by alice\n"
    tcp.send(b"hi alice\n")
    session.wait_for(b"hi alice\n")
    session.finish()


def test_plain_bytes_on_the_tls_port_are_dropped_and_the_gateway_keeps_serving(gw, certs):
    tcp = Line(gw.ports["tcp"])
    garbage = Line(gw.ports["tls"])
    garbage.send(b"GET / HTTP/1.0\r\n\r\nhello in the clear\n")
    assert garbage.closed()
    assert tcp.nothing_within(0.3)
    session = Interactive(s_client(gw.ports["tls"], certs))
    session.wait_for(b"welcome tls-")
    session.send(b"still serving")
    assert tcp.line() == b"still serving"
    session.finish()


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_handshake_deadline_closes_silent_and_trickling_clients(gw, certs):
    # The fixture's gateway has handshake_timeout = 1.0.
    started = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", gw.ports["tls"]), timeout=TIMEOUT)
    trickle = socket.create_connection(("127.0.0.1", gw.ports["tls"]), timeout=0.3)
    # A ClientHello sent one byte every 0.3 s: an idle timer would never fire.
    hello = bytes.fromhex("16030100c8010000c40303") + bytes(200)
    closed = False
    for byte in hello:
        try:
            trickle.sendall(bytes([byte]))
            closed = trickle.recv(100) == b""
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        if closed:
            break
    assert closed
    assert _closed_by_server(silent)
    assert time.monotonic() - started < 5
    gw.wait_count("handshake not finished within 1 s", 2)


def _served_fingerprint(port: int, certs: Path) -> str:
    result = subprocess.run(
        [*s_client(port, certs), "-showcerts"], input=b"", capture_output=True, timeout=TIMEOUT
    )
    leaf = re.search(
        rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", result.stdout, re.S
    )
    assert leaf, result.stdout
    return x509.load_pem_x509_certificate(leaf.group(0)).serial_number.to_bytes(20, "big").hex()


def test_sighup_reloads_the_certificate_for_new_connections(gw, certs):
    port = gw.ports["tls"]
    tcp = Line(gw.ports["tcp"])
    before = _served_fingerprint(port, certs)
    old_session = Interactive(s_client(port, certs))
    old_session.wait_for(b"welcome tls-")

    ca, ca_key = _load_ca(certs)
    new_cert, new_key = issue_certificate(ca, ca_key, "localhost", hosts=("localhost", "127.0.0.1"))  # type: ignore[arg-type]
    (certs / "server.pem").write_bytes(pem(new_cert))
    (certs / "server.key").write_bytes(pem_key(new_key))
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for("reloaded TLS material")
    after = _served_fingerprint(port, certs)
    assert after != before
    assert after == new_cert.serial_number.to_bytes(20, "big").hex()
    old_session.send(b"old connection still up")
    assert tcp.line() == b"old connection still up"

    # A bad file is logged and the current certificate kept.
    (certs / "server.pem").write_text("garbage")
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for("not a PEM certificate; keeping the running configuration")
    assert _served_fingerprint(port, certs) == after
    old_session.finish()


def test_generate_dev_cert_creates_ca_and_certificate_on_first_start(run_gateway, tmp_path):
    folder = tmp_path / "fresh"
    toml = toml_listener("tls", certs=folder, generate_dev_cert=True, welcome="dev {peer}")
    gw = run_gateway(toml)
    match = gw.wait_for(r"SHA-256 fingerprint ([0-9A-F:]+)")
    assert (folder / "server.key").stat().st_mode & 0o777 == 0o600
    assert (folder / "ca.key").stat().st_mode & 0o777 == 0o600
    fingerprint = subprocess.run(
        [OPENSSL, "x509", "-noout", "-fingerprint", "-sha256", "-in", str(folder / "ca.pem")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    ).stdout
    assert match.group(1) in fingerprint
    session = Interactive(s_client(gw.ports["tls"], folder))
    session.wait_for(b"dev tls-1")
    assert b"Verify return code: 0 (ok)" in session.finish()


def test_tls_client_verifies_the_hostname(gw, certs, tmp_path):
    port = gw.ports["tls"]
    ok = subprocess.run(
        [*GATEWAY, "client", f"tls://localhost:{port}", "--ca", str(certs / "ca.pem")],
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert ok.returncode == 0, ok.stderr
    assert b"welcome tls-" in ok.stdout
    missing_ca = subprocess.run(
        [*GATEWAY, "client", f"tls://localhost:{port}", "--ca", str(tmp_path / "nope.pem")],
        input=b"",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert missing_ca.returncode == 2
    assert b"--ca" in missing_ca.stderr


def test_tls_client_refuses_a_certificate_for_another_host(run_gateway, tmp_path):
    other = tmp_path / "other"
    make_certs(other, "--host", "elsewhere.test")
    gw = run_gateway(config(other, mtls=False))
    mismatch = subprocess.run(
        [*GATEWAY, "client", f"tls://localhost:{gw.ports['tls']}", "--ca", str(other / "ca.pem")],
        stdin=subprocess.PIPE,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert mismatch.returncode == 1
    assert b"TLS handshake failed" in mismatch.stderr
    assert b"welcome" not in mismatch.stdout
