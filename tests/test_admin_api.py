"""The admin API against the real gateway: the admin token, /stats, /channels, and the
actions (closing a peer, publishing as the operator), each logged with who did it."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from gateway.auth.credentials import new_token, token_digest
from tests.conftest import GATEWAY, TIMEOUT, GatewayProcess, Line, websocket
from tests.toml import toml_listener, toml_table

TOKEN = new_token()


def config(token: bool = True, open_metrics: bool | None = None) -> str:
    admin: dict[str, Any] = {"port": 0}
    if token:
        admin["token_sha256"] = token_digest(TOKEN)
    if open_metrics is not None:
        admin["open_metrics"] = open_metrics
    return (
        toml_table("admin", **admin)
        + toml_listener("tcp", welcome="hi {peer}")
        + toml_listener("ws", ping_interval=0)
    )


def call(
    gw: GatewayProcess, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one admin request (POST when ``body``)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{gw.ports['admin']}{path}", data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, raw, headers = e.code, e.read(), dict(e.headers)
    text = raw.decode()
    parsed = json.loads(text) if headers.get("Content-Type") == "application/json" else text
    return status, parsed, headers


def test_with_a_token_every_request_needs_it(run_gateway):
    gw = run_gateway(config(), listeners=3)
    for path in ("/healthz", "/metrics", "/peers", "/stats", "/channels"):
        status, body, headers = call(gw, path, token=None)
        assert status == 401, path
        assert "Bearer" in body["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert call(gw, path, token="not-the-token")[0] == 401
        assert call(gw, path)[0] == 200, path
    assert TOKEN not in "\n".join(gw.log)


def test_open_metrics_leaves_healthz_and_metrics_open(run_gateway):
    gw = run_gateway(config(open_metrics=True), listeners=3)
    assert call(gw, "/healthz", token=None)[:2] == (200, "ok\n")
    assert call(gw, "/metrics", token=None)[0] == 200
    assert call(gw, "/peers", token=None)[0] == 401


def test_stats_and_channels_after_known_traffic(run_gateway):
    gw = run_gateway(config(), listeners=3)
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    a.line(), b.line()
    with websocket(gw, "ws", subprotocols=["gateway.v1.json"]) as browser:
        browser.recv(timeout=TIMEOUT)  # welcome
        browser.send('{"type":"subscribe","channel":"room.1"}')
        browser.recv(timeout=TIMEOUT)
        a.send(b"one\ntwo\n")
        assert b.lines(2) == [b"one", b"two"]
        status, stats, _ = call(gw, "/stats")
        assert status == 200
        assert stats["connections"] == {"tcp": 2, "ws": 1}
        assert stats["peers"] == 3
        assert stats["messages_received"] == 2
        assert stats["messages_delivered"] >= 4  # b and the browser, twice each
        assert stats["uptime_seconds"] > 0 and stats["version"]
        status, listed, _ = call(gw, "/channels?limit=1")
        assert status == 200
        assert listed == {
            "total": 2,
            "limit": 1,
            "channels": [{"channel": "main", "subscribers": 3}],
        }
    assert call(gw, "/channels?limit=x")[0] == 400


def test_peers_q_searches_every_peer_before_paging(run_gateway):
    gw = run_gateway(config(), listeners=3)
    peers = [Line(gw.ports["tcp"]) for _ in range(12)]
    try:
        for peer in peers:
            peer.line()
        status, listed, _ = call(gw, "/peers?limit=2")
        assert status == 200 and "matched" not in listed  # without q: as before
        assert (listed["total"], [p["id"] for p in listed["peers"]]) == (12, ["tcp-1", "tcp-2"])
        status, found, _ = call(gw, "/peers?q=TCP-1&limit=2&offset=1")
        assert status == 200
        assert (found["total"], found["matched"]) == (12, 4)  # tcp-1, tcp-10, tcp-11, tcp-12
        assert [p["id"] for p in found["peers"]] == ["tcp-10", "tcp-11"]
        port = peers[5].sock.getsockname()[1]  # ephemeral: 5 digits, in no other port
        by_address = call(gw, f"/peers?q=127.0.0.1:{port}")[1]
        assert [p["id"] for p in by_address["peers"]] == ["tcp-6"]
        assert call(gw, "/peers?q=nobody")[1]["matched"] == 0
    finally:
        for peer in peers:
            peer.close()


def test_the_operator_closes_a_peer_and_publishes_and_both_are_logged(run_gateway):
    gw = run_gateway(config(), listeners=3)
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    assert a.line() == b"hi tcp-1"
    b.line()
    status, body, _ = call(gw, "/publish", {"channel": "main", "text": "from the operator"})
    assert (status, body) == (200, {"channel": "main", "reached": 2})
    assert a.line() == b"from the operator" and b.line() == b"from the operator"
    gw.wait_for(r"admin: published to main \(by the admin token holder from 127\.0\.0\.1\)")
    assert call(gw, "/peers/tcp-2/close", {})[:2] == (200, {"closed": "tcp-2"})
    assert b.closed()
    gw.wait_for(r"tcp-2 disconnected \(closed by the operator\)")
    gw.wait_for(r"admin: closed tcp-2 \(by the admin token holder")
    assert call(gw, "/peers/tcp-9/close", {})[0] == 404
    assert call(gw, "/publish", {"channel": "room.*", "text": "x"})[0] == 400
    assert call(gw, "/publish", {"channel": "main"})[0] == 400
    assert call(gw, "/publish", {"channel": "main", "base64": "%%"})[0] == 400
    assert call(gw, "/publish", {"channel": "main", "text": "x"}, token=None)[0] == 401
    assert call(gw, "/stats", {})[0] == 405


def test_without_a_token_reads_are_open_on_loopback_and_actions_refused(run_gateway):
    gw = run_gateway(config(token=False), listeners=3)
    assert call(gw, "/stats", token=None)[0] == 200
    status, body, _ = call(gw, "/publish", {"channel": "main", "text": "x"}, token=None)
    assert status == 403 and "token_sha256" in body["error"]
    assert call(gw, "/peers/tcp-1/close", {}, token=None)[0] == 403


@pytest.mark.parametrize(
    ("admin", "wanted"),
    [
        ('host = "0.0.0.0"\nport = 0', "admin.token_sha256: missing: the admin listener is"),
        ('port = 0\ntoken_sha256 = "abc"', "admin.token_sha256: expected the 64 hex digits"),
    ],
)
def test_admin_config_errors_name_the_key(tmp_path, admin, wanted):
    path = tmp_path / "gateway.toml"
    path.write_text(f"[admin]\n{admin}\n" + toml_listener("tcp"))
    done = subprocess.run(
        [*GATEWAY, "--config", str(path), "--check"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert wanted in done.stderr


def test_gateway_top_once_shows_totals_and_the_busiest_peers(run_gateway):
    gw = run_gateway(config(), listeners=3)
    quiet, busy = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    quiet.line(), busy.line()
    admin = f"http://127.0.0.1:{gw.ports['admin']}"
    top = subprocess.Popen(
        [*GATEWAY, "top", "--once", "--admin", admin, "--token", TOKEN, "--sort", "in"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done = threading.Event()

    def chatter() -> None:  # keeps busy busy until top has taken both samples
        while not done.wait(0.01):
            busy.send(b"tick\n")

    sender = threading.Thread(target=chatter)
    sender.start()
    try:
        out, err = top.communicate(timeout=TIMEOUT)
    finally:
        done.set()
        sender.join()
    assert top.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("gateway ") and "peers 2" in lines[0]
    assert lines[1] == "connections: tcp 2"
    assert lines[2].startswith("messages: in ")
    header = next(i for i, line in enumerate(lines) if line.startswith("PEER"))
    assert "sorted by in/s" in lines[header]
    assert lines[header + 1].startswith("tcp-2 ")  # the busy one first
    assert lines[header + 2].startswith("tcp-1 ")
    refused = subprocess.run(
        [*GATEWAY, "top", "--once", "--admin", admin], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 1
    assert "needs the admin token: give --token" in refused.stderr
