"""Signing in against the real gateway: credentials made by the real ``gateway passwd`` and
``gateway token new``, real clients (``gateway client``, a socket, ``openssl s_client`` with a
client certificate), and a debug-level log that never shows a secret."""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import (
    GATEWAY,
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
PASSWORD = "a long passphrase, spaces and all"


def made(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [*GATEWAY, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def secrets(tmp_path: Path) -> tuple[str, str, str]:
    """(the token, and the [auth] tables for it and for alice's password)."""
    out = made("token", "new", "sensor")
    token = next(line for line in out.splitlines() if len(line) >= 40 and " " not in line)
    tables = out[out.index("[auth.tokens.sensor]") :].replace("roles = []", 'roles = ["member"]')
    tables += made("passwd", "--user", "alice", stdin=PASSWORD + "\n").replace(
        "roles = []", 'roles = ["member"]'
    )
    return token, tables, out


@pytest.fixture
def gw(run_gateway, secrets, tmp_path: Path) -> GatewayProcess:
    certs = tmp_path / "certs"
    make_certs(certs, "--client", "alice")
    _, tables, _ = secrets
    roles = '\n[roles.member]\npublish = ["main"]\nsubscribe = ["main"]\n'
    gateway: GatewayProcess = run_gateway(
        toml_table("gateway", log_level="debug")
        + roles
        + tables
        + toml_listener("tcp", auth=["password", "token"], welcome="hi {user}")
        + toml_listener("ws", auth=["password", "token"], welcome="hi {user}", ping_interval=0)
        + toml_listener(
            "tls",
            certs=certs,
            client_ca=certs / "ca.pem",
            auth=["cert"],
            welcome="hi {user} ({peer})",
        )
    )
    gateway.certs = certs  # type: ignore[attr-defined]
    return gateway


def test_a_token_made_by_gateway_token_new_signs_gateway_client_in(gw, secrets):
    token, _, printed = secrets
    assert printed.count(token) == 1
    alice = Line(gw.ports["tcp"])
    alice.send(f"AUTH password alice {PASSWORD}\n".encode())
    assert alice.line() == b"hi alice"
    client = gateway_client(f"tcp://127.0.0.1:{gw.ports['tcp']}", "--token", token)
    client.wait_for(b"hi sensor")
    client.send(b"from the sensor")
    assert alice.line() == b"from the sensor"
    client.finish()


def test_a_wrong_token_is_refused_and_closed(gw):
    sock = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=TIMEOUT)
    sock.sendall(b"AUTH token not-the-token\nsneaked in\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert data == b"gateway: authentication failed\n"
    gw.wait_for('did not sign in on listener "tcp" \\(authentication failed\\)')


def test_a_client_certificate_signs_its_user_in(gw):
    certs: Path = gw.certs
    session = Interactive(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{gw.ports['tls']}",
            "-servername",
            "localhost",
            "-CAfile",
            str(certs / "ca.pem"),
            "-cert",
            str(certs / "alice.pem"),
            "-key",
            str(certs / "alice.key"),
        ]
    )
    session.wait_for(b"hi alice (tls-1:alice)")
    listener = Line(gw.ports["tcp"])
    listener.send(f"AUTH password alice {PASSWORD}\n".encode())
    assert listener.line() == b"hi alice"
    session.send(b"over mutual TLS")
    assert listener.line() == b"over mutual TLS"
    session.finish()


def test_no_secret_is_ever_logged_even_at_debug(gw, secrets):
    token, tables, _ = secrets
    digest = tomllib.loads(tables)["auth"]["tokens"]["sensor"]["sha256"]
    hashed = tomllib.loads(tables)["auth"]["users"]["alice"]["password"]
    for first in (f"AUTH token {token}", f"AUTH password alice {PASSWORD}", "AUTH token guess-1"):
        line = Line(gw.ports["tcp"])
        line.send(first.encode() + b"\nhello\n")
        line.line()
    gw.wait_for("did not sign in")
    gw.stop()
    log = "\n".join(gw.log)
    assert "connected from" in log
    for secret in (token, PASSWORD, "guess-1", digest, hashed):
        assert secret not in log


def test_a_websocket_upgrade_may_sign_in_with_an_authorization_header(gw, secrets):
    token, _, _ = secrets
    with websocket(gw, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert ws.recv(timeout=TIMEOUT) == "hi sensor"
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    with websocket(gw, additional_headers={"Authorization": f"Basic {basic}"}) as ws:
        assert ws.recv(timeout=TIMEOUT) == "hi alice"
        ws.send("from a header")
    for bad in ("Bearer not-it", "Basic " + base64.b64encode(b"alice:wrong").decode(), "Digest x"):
        with pytest.raises(InvalidStatus) as refused:
            websocket(gw, additional_headers={"Authorization": bad})
        assert refused.value.response.status_code == 401
    # Browsers send no header: the first message signs them in as before.
    with websocket(gw) as ws:
        ws.send(f"AUTH token {token}")
        assert ws.recv(timeout=TIMEOUT) == "hi sensor"
