"""Channels chosen by real clients against the real gateway: `gateway client --json
--subscribe`, a JSON-lines TCP client, a raw netcat-style user, a WebSocket on /ws/<channel>."""

from __future__ import annotations

import json
import socket
import subprocess

from websockets.sync.client import connect as ws_connect

from tests.conftest import GATEWAY, TIMEOUT, Line

CONFIG = """
[[listeners]]
name = "raw"
type = "tcp"
port = 0
channel = "room.1"

[[listeners]]
name = "json"
type = "tcp"
port = 0
format = "json"

[[listeners]]
name = "ws"
type = "ws"
port = 0
ping_interval = 0
"""


def json_line(line: Line) -> dict[str, object]:
    value: dict[str, object] = json.loads(line.line())
    return value


def test_clients_on_the_channels_they_chose(run_gateway):
    gw = run_gateway(CONFIG)
    raw = Line(gw.ports["raw"])  # on room.1, its listener's channel
    lines = Line(gw.ports["json"])
    assert json_line(lines)["type"] == "welcome"
    lines.send(b'{"type":"subscribe","channel":"room.*","id":1}\n')
    assert json_line(lines) == {"type": "subscribed", "channel": "room.*", "id": 1}
    with ws_connect(f"ws://127.0.0.1:{gw.ports['ws']}/ws/room.2", open_timeout=TIMEOUT) as web:
        raw.send(b"from the raw user\n")
        event = json_line(lines)
        assert (event["type"], event["channel"], event["text"]) == (
            "message",
            "room.1",
            "from the raw user",
        )
        web.send("from the browser on room.2")
        event = json_line(lines)
        assert (event["channel"], event["text"]) == ("room.2", "from the browser on room.2")
        lines.send(b'{"type":"message","channel":"room.2","text":"to the browser"}\n')
        assert web.recv(timeout=TIMEOUT) == "to the browser"
        assert raw.nothing_within(0.2)  # room.1 wants none of room.2


def test_gateway_client_json_and_subscribe(run_gateway):
    gw = run_gateway(CONFIG)
    client = subprocess.Popen(
        [*GATEWAY, "client", f"ws://127.0.0.1:{gw.ports['ws']}/ws", "--subscribe", "room.>"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        events = [json.loads(client.stdout.readline()) for _ in range(2)]
        assert [e["type"] for e in events] == ["welcome", "subscribed"]
        raw = Line(gw.ports["raw"])
        raw.send(b"hello client\n")
        event = json.loads(client.stdout.readline())
        assert (event["channel"], event["text"]) == ("room.1", "hello client")
        client.stdin.write(b'{"type":"message","channel":"room.1","text":"typed"}\nplain\n')
        client.stdin.flush()
        assert raw.line() == b"typed"  # a JSON line is sent as the request it is
        client.stdin.close()
        status = client.wait(timeout=TIMEOUT)
        assert client.stderr is not None
        assert status == 0, client.stderr.read().decode(errors="replace")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_a_bad_channel_in_a_websocket_url_is_a_400(run_gateway):
    gw = run_gateway(CONFIG)
    with socket.create_connection(("127.0.0.1", gw.ports["ws"]), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"GET /ws/room..1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
