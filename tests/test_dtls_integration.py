"""``dtls`` listeners against the real ``gateway`` command, with the real
``openssl s_client -dtls1_2``: relay both ways, mutual DTLS, DTLS 1.0 refused, reload,
and close_notify both ways."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    TIMEOUT,
    GatewayProcess,
    Interactive,
    Line,
    gateway_client,
    make_certs,
    websocket,
)
from tests.toml import toml_listener, toml_table

OPENSSL = shutil.which("openssl") or "openssl"


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    make_certs(folder, "--client", "alice")
    return folder


def config(certs: Path, mtls: bool = False) -> str:
    return (
        toml_table("limits", handshake_timeout=2.0)
        + toml_listener(
            "dtls",
            certs=certs,
            client_ca=certs / "ca.pem" if mtls else None,
            welcome="welcome {peer}",
            peer_timeout=30,
        )
        + toml_listener("tcp")
        + toml_listener("ws", ping_interval=0)
    )


def s_client(gw: GatewayProcess, certs: Path, *extra: str) -> list[str]:
    return [
        OPENSSL,
        "s_client",
        "-dtls1_2",
        "-connect",
        f"127.0.0.1:{gw.ports['dtls']}",
        "-servername",
        "localhost",
        "-CAfile",
        str(certs / "ca.pem"),
        "-verify_return_error",
        *extra,
    ]


def test_s_client_relays_both_ways_and_its_close_notify_ends_the_peer(run_gateway, certs):
    gw = run_gateway(config(certs))
    tcp = Line(gw.ports["tcp"])
    browser = websocket(gw)
    session = Interactive(s_client(gw, certs))
    out = session.wait_for(b"welcome dtls-1")
    assert b"Verify return code: 0 (ok)" in out
    gw.wait_for(r"dtls-1 joined from 127\.0\.0\.1:")
    session.send(b"from s_client")
    assert tcp.line() == b"from s_client"
    assert browser.recv(timeout=TIMEOUT) == "from s_client"
    tcp.send(b"from tcp\n")
    session.wait_for(b"from tcp\n")
    browser.send("from the page")
    session.wait_for(b"from the page\n")
    session.finish()  # end of input: s_client sends close_notify
    gw.wait_for(r"dtls-1 left \(closed by the peer\)")
    browser.close()


def test_mutual_dtls_names_the_peer_and_refuses_clients_without_a_certificate(run_gateway, certs):
    gw = run_gateway(config(certs, mtls=True))
    tcp = Line(gw.ports["tcp"])
    cert = ("-cert", str(certs / "alice.pem"), "-key", str(certs / "alice.key"))
    session = Interactive(s_client(gw, certs, *cert))
    session.wait_for(b"welcome dtls-1:alice")
    session.send(b"signed by alice")
    assert tcp.line() == b"signed by alice"
    session.finish()
    refused = subprocess.run(
        [*s_client(gw, certs), "-ign_eof"],
        input=b"must not pass\n",
        capture_output=True,
        timeout=TIMEOUT,
    )
    gw.wait_for(r"failed the DTLS handshake on listener \"dtls\" \(handshake failed: peer did not")
    assert b"welcome" not in refused.stdout
    assert tcp.nothing_within(0.3)


def test_dtls_1_0_is_refused(run_gateway, certs):
    gw = run_gateway(config(certs))
    tcp = Line(gw.ports["tcp"])
    done = subprocess.run(
        [*s_client(gw, certs)[:2], "-dtls1", *s_client(gw, certs)[3:], "-ign_eof"],
        input=b"must not pass\n",
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    assert b"protocol version" in done.stderr
    gw.wait_for(r"failed the DTLS handshake .*unsupported protocol")
    assert tcp.nothing_within(0.3)


def test_sighup_reloads_the_certificate_for_new_sessions(run_gateway, certs, tmp_path):
    gw = run_gateway(config(certs))
    fresh = tmp_path / "fresh"
    make_certs(fresh)
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(fresh / name, certs / name)
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for(r'listener "dtls": reloaded TLS material')
    session = Interactive(s_client(gw, certs))  # trusts only the new CA now
    session.wait_for(b"welcome dtls-1")
    session.finish()


def test_a_gateway_shutdown_sends_close_notify(run_gateway, certs):
    gw = run_gateway(config(certs))
    session = Interactive(s_client(gw, certs))
    session.wait_for(b"welcome dtls-1")
    gw.proc.send_signal(signal.SIGTERM)
    assert session.proc.wait(TIMEOUT) == 0  # s_client saw the close_notify and ended
    assert b"closed" in session.finish()
    gw.wait_for(r"dtls-1 left \(gateway stopping\)")


def test_a_client_certificate_signs_the_device_in(run_gateway, certs):
    roles = '\n[roles.member]\npublish = ["main"]\nsubscribe = ["main"]\n'
    # A user with no password: only its certificate can sign it in.
    users = '\n[auth.users.alice]\nroles = ["member"]\n'
    gw = run_gateway(
        roles
        + users
        + toml_listener(
            "dtls",
            certs=certs,
            client_ca=certs / "ca.pem",
            auth=["cert"],
            welcome="hi {user} ({peer})",
        )
        + toml_listener("tcp")
    )
    tcp = Line(gw.ports["tcp"])
    cert = ("-cert", str(certs / "alice.pem"), "-key", str(certs / "alice.key"))
    session = Interactive(s_client(gw, certs, *cert))
    session.wait_for(b"hi alice (dtls-1:alice)")
    session.send(b"as alice")
    assert tcp.line() == b"as alice"
    session.finish()


def test_gateway_client_speaks_dtls(run_gateway, certs):
    gw = run_gateway(config(certs))
    tcp = Line(gw.ports["tcp"])
    url = f"dtls://localhost:{gw.ports['dtls']}"
    client = gateway_client(url, "--ca", str(certs / "ca.pem"))
    client.wait_for(b"welcome dtls-1")
    client.send(b"typed in gateway client")
    assert tcp.line() == b"typed in gateway client"
    tcp.send(b"back to it\n")
    client.wait_for(b"back to it\n")
    client.finish()  # end of input: close_notify, exit 0
    assert client.proc.returncode == 0
    gw.wait_for(r"dtls-1 left \(closed by the peer\)")
