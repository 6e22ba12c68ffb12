"""Operations against the real gateway: admin HTTP, JSON logs, signals, history, endpoints."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    GATEWAY,
    TIMEOUT,
    Datagram,
    GatewayProcess,
    Line,
    admin_get,
    metric,
    read_until_closed,
    stalled_reader,
    websocket,
)
from tests.toml import toml_listener, toml_table

BASE = (
    toml_table("gateway", name="ops")
    + toml_table("admin", port=0)
    + toml_listener("tcp", welcome="hello {peer}")
    + toml_listener("udp")
    + toml_listener("ws")
)


def test_healthz_metrics_and_peers_after_known_traffic(run_gateway):
    gw = run_gateway(BASE, listeners=4)
    assert admin_get(gw, "/healthz") == (200, "ok\n")
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    a.line(), b.line()
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    a.send(b"one\ntwo\nthree\n")
    assert b.lines(3) == [b"one", b"two", b"three"]
    for _ in range(3):
        udp.recv()
    udp.send(b"four")
    assert a.line() == b"four" and b.line() == b"four"

    status, text = admin_get(gw, "/metrics")
    assert status == 200
    assert metric(text, "gateway_connections", listener="tcp", transport="tcp") == 2
    assert metric(text, "gateway_connections", listener="udp", transport="udp") == 1
    assert metric(text, "gateway_messages_received_total", listener="tcp", transport="tcp") == 3
    assert metric(text, "gateway_messages_received_total", listener="udp", transport="udp") == 1
    assert metric(text, "gateway_bytes_received_total", listener="tcp", transport="tcp") == 11
    # tcp: 3 to b, 1 to a, 1 to b; udp: 3
    assert metric(text, "gateway_messages_delivered_total", listener="tcp", transport="tcp") == 5
    assert metric(text, "gateway_messages_delivered_total", listener="udp", transport="udp") == 3
    assert metric(text, "gateway_bytes_delivered_total", listener="udp", transport="udp") == 11
    assert metric(text, "gateway_udp_peers", listener="udp") == 1
    assert metric(text, "gateway_fan_out_seconds_count") == 2
    assert "gateway_messages_dropped_total" in text and "gateway_disconnects_total" in text
    assert (
        "gateway_tls_handshake_failures_total" in text or "gateway_tls_handshake_failures" in text
    )

    status, body = admin_get(gw, "/peers")
    peers = json.loads(body)
    assert status == 200 and peers["total"] == 3
    first = peers["peers"][0]
    assert first["id"] == "tcp-1" and first["listener"] == "tcp" and first["transport"] == "tcp"
    assert first["channel"] == "main" and first["address"].startswith("127.0.0.1:")
    assert (first["messages_in"], first["bytes_in"], first["messages_out"]) == (3, 11, 1)
    assert first["pending_bytes"] == 0 and first["tls_subject"] is None
    assert first["connected_since"] > 1.7e9
    page = json.loads(admin_get(gw, "/peers?limit=1&offset=2")[1])
    assert page["total"] == 3 and [p["id"] for p in page["peers"]] == ["udp-1"]
    assert admin_get(gw, "/peers?limit=x")[0] == 400

    # One peer leaves: its deliveries stay counted.
    b.close()
    gw.wait_for("tcp-2 disconnected")
    text = admin_get(gw, "/metrics")[1]
    assert metric(text, "gateway_messages_delivered_total", listener="tcp", transport="tcp") == 5
    assert metric(text, "gateway_connections", listener="tcp", transport="tcp") == 1


def test_json_logs_parse(run_gateway):
    gw = run_gateway(
        toml_table("gateway", log_format="json", log_level="debug") + toml_listener("tcp"),
        listeners=0,
    )
    gw.wait_for('"message": "listening tcp')
    records = [json.loads(line) for line in gw.log]
    listening = next(r for r in records if r["message"].startswith("listening tcp"))
    assert listening["level"] == "info" and listening["time"]
    port = int(listening["message"].split(":")[1].split(" ")[0])
    Line(port)
    gw.wait_for('"peer": "tcp-1"')
    assert all(isinstance(json.loads(line), dict) for line in gw.log)


def test_log_level_hides_info(tmp_path):
    config = tmp_path / "quiet.toml"
    # A UDP listener open to every source without the challenge logs a warning at start.
    config.write_text(
        toml_table("gateway", log_level="warn") + toml_listener("udp", allow=["0.0.0.0/0"])
    )
    gw = GatewayProcess(config)
    gw.wait_for(r"\[warn\].*reflector")
    gw.wait_handles(signal.SIGTERM)
    assert gw.stop(signal.SIGTERM) == 0
    assert not [line for line in gw.log if "[info]" in line]


def test_sigterm_drains_queued_output_then_exits_0(run_gateway):
    gw = run_gateway(
        toml_table("gateway", shutdown_timeout=10)
        + toml_table("admin", port=0)
        + toml_listener("tcp")
        + toml_listener("ws"),
        listeners=3,
    )
    sender = Line(gw.ports["tcp"])
    reader = stalled_reader(gw.ports["tcp"])
    with websocket(gw, max_queue=None) as ws:
        gw.wait_for("ws-1 connected")
        gw.wait_for("tcp-2 connected")
        lines = [b"%06d" % i + b"q" * 500 for i in range(1000)]  # ~500 KB: queued in the gateway
        sender.send(b"\n".join(lines) + b"\n")
        for expected in lines:  # the gateway has read everything; the slow reader has not
            assert ws.recv(timeout=TIMEOUT) == expected.decode()
        gw.proc.send_signal(signal.SIGTERM)
        gw.wait_for("shutting down")
        assert admin_get(gw, "/healthz") == (503, "gateway: shutting down\n")
        got = read_until_closed(reader).split(b"\n")
        assert got.pop() == b""
        assert got == lines  # every queued message, then a clean close
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert gw.proc.wait(timeout=TIMEOUT) == 0


def test_sighup_reloads_welcome_and_limits_and_refuses_listener_changes(run_gateway, tmp_path):
    gw = run_gateway(BASE, listeners=4)
    assert Line(gw.ports["tcp"]).line() == b"hello tcp-1"
    path = gw.config
    changed = (
        path.read_text()
        .replace('welcome = "hello {peer}"', 'welcome = "reloaded {peer}"')
        .replace("[admin]", "[limits]\nmax_message_bytes = 10\n\n[admin]")
        + '\n[[listeners]]\nname = "extra"\ntype = "tcp"\nport = 0\n'
    )
    path.write_text(changed)
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for('reload: adding listener "extra" needs a restart; not applied')
    gw.wait_for("reload: applied")
    fresh = Line(gw.ports["tcp"])
    assert fresh.line() == b"reloaded tcp-2"
    other = Line(gw.ports["tcp"])
    other.line()
    fresh.send(b"0123456789\n")
    assert other.line() == b"0123456789"
    fresh.send(b"01234567890\n")  # now over the reloaded limit
    assert fresh.closed()
    assert "extra" not in "\n".join(line for line in gw.log if line.count("listening"))

    path.write_text("this is [not toml")
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for("reload: .*invalid TOML.*keeping the running configuration")
    assert Line(gw.ports["tcp"]).line() == b"reloaded tcp-4"


def test_unix_socket_listener_from_an_endpoint_string(run_gateway, tmp_path):
    path = tmp_path / "gw.sock"
    gw = run_gateway(
        toml_listener("local", "tcp", port=None, endpoint=f"unix:{path}") + toml_listener("tcp"),
        listeners=1,
    )
    gw.wait_for(f'listening tcp endpoint unix:{path} \\(listener "local"')
    unix = socket.socket(socket.AF_UNIX)
    unix.settimeout(TIMEOUT)
    unix.connect(str(path))
    gw.wait_for("local-1 connected")
    tcp = Line(gw.ports["tcp"])
    gw.wait_for("tcp-1 connected")
    unix.sendall(b"over unix\n")
    assert tcp.line() == b"over unix"
    tcp.send(b"back\n")
    assert unix.recv(100) == b"back\n"


def test_bad_endpoint_is_a_config_error(tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text(toml_listener("x", "tcp", port=None, endpoint="carrier-pigeon:1"))
    result = subprocess.run(
        [*GATEWAY, "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert "listeners[0].endpoint: expected a server endpoint string" in result.stderr
