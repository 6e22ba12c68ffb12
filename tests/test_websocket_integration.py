"""ws and wss listeners against the real gateway command, with the ``websockets`` client."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import struct
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    JSON_SUBPROTOCOL,
    TIMEOUT,
    Datagram,
    GatewayProcess,
    Line,
    close_code,
    dev_ca,
    gateway_client,
    masked_frame,
    read_until_closed,
    tls_connect,
    websocket,
    websocket_upgrade,
    ws_url,
)
from tests.toml import toml_listener, toml_table


def config(certs: Path) -> str:
    return (
        toml_table("limits", max_message_bytes=1000)
        + toml_listener("tcp")
        + toml_listener("tls", certs=certs)
        + toml_listener("udp")
        + toml_listener("ws")
        # generate_dev_cert also serves the tls listener above, which starts first.
        + toml_listener("wss", certs=certs, generate_dev_cert=True)
    )


@pytest.fixture
def gw(run_gateway, tmp_path):
    return run_gateway(config(tmp_path / "certs"))


def read_line(sock: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "closed"
        data += chunk
    return data[:-1]


def test_ws_relays_to_and_from_tcp_tls_and_udp(gw):
    tcp = Line(gw.ports["tcp"])
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    tls = tls_connect(gw)
    with websocket(gw) as client:
        gw.wait_for("ws-1 connected")
        gw.wait_for("udp-1 joined")
        gw.wait_for("tls-1 connected")
        client.send("from ws")
        assert tcp.line() == b"from ws"
        assert udp.recv() == b"from ws\n"
        assert read_line(tls) == b"from ws"
        tcp.send(b"from tcp\n")
        assert client.recv(timeout=TIMEOUT) == "from tcp"  # text frame, no newline
        tcp.send(b"\xff\xfebinary\n")
        assert client.recv(timeout=TIMEOUT) == b"\xff\xfebinary"  # not UTF-8: a binary frame
        udp.send(b"from udp\n")
        assert client.recv(timeout=TIMEOUT) == "from udp"
        tls.sendall(b"from tls\r\n")
        assert client.recv(timeout=TIMEOUT) == "from tls"
    tls.close()


def test_wss_relays_with_the_dev_ca(gw):
    tcp = Line(gw.ports["tcp"])
    with websocket(gw, "wss") as client:
        gw.wait_for("wss-1 connected")
        client.send("over wss")
        assert tcp.line() == b"over wss"
        tcp.send(b"back over wss\n")
        assert client.recv(timeout=TIMEOUT) == "back over wss"


def test_websocket_to_websocket_keeps_the_opcode(gw):
    with websocket(gw) as a, websocket(gw, "wss") as b:
        gw.wait_for("wss-1 connected")
        a.send("text stays text")
        assert b.recv(timeout=TIMEOUT) == "text stays text"
        a.send(b"binary stays binary")
        assert b.recv(timeout=TIMEOUT) == b"binary stays binary"
        b.send(b"\x00\x01")
        assert a.recv(timeout=TIMEOUT) == b"\x00\x01"


def test_origin_policy(gw):
    port = gw.ports["ws"]
    with pytest.raises(InvalidStatus) as refused:
        websocket(gw, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with websocket(gw, origin=f"http://127.0.0.1:{port}") as same_origin:
        same_origin.send("same origin ok")
    with websocket(gw) as no_origin:  # non-browser clients send no Origin
        no_origin.send("no origin ok")


def test_oversize_message_closes_with_1009_and_others_are_unaffected(gw):
    tcp = Line(gw.ports["tcp"])
    with websocket(gw) as big, websocket(gw) as other:
        gw.wait_for("ws-2 connected")
        big.send("x" * 1001)
        with pytest.raises(ConnectionClosed) as closed:
            big.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        other.send("still fine")
        assert tcp.line() == b"still fine"
        assert tcp.nothing_within(0.2)


def test_invalid_utf8_text_frame_closes_with_1007(gw):
    tcp = Line(gw.ports["tcp"])
    port = gw.ports["ws"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    websocket_upgrade(sock, host=f"127.0.0.1:{port}")
    sock.sendall(masked_frame(0x81, b"bad \xff\xfe text"))
    assert close_code(sock) == 1007
    assert tcp.nothing_within(0.3)


def test_json_subprotocol_envelopes_welcome_and_presence(gw):
    with websocket(gw, subprotocols=[JSON_SUBPROTOCOL]) as client:
        assert client.subprotocol == "gateway.v1.json"
        welcome = json.loads(client.recv(timeout=TIMEOUT))
        assert welcome["type"] == "welcome"
        assert welcome["peer"] == "ws-1"
        assert welcome["count"] == 1
        tcp = Line(gw.ports["tcp"])
        join = json.loads(client.recv(timeout=TIMEOUT))
        assert {k: join[k] for k in ("type", "peer", "transport", "count")} == {
            "type": "join",
            "peer": "tcp-1",
            "transport": "tcp",
            "count": 2,
        }
        tcp.send(b"hi\n")
        assert json.loads(client.recv(timeout=TIMEOUT)) == {
            "type": "message",
            "from": "tcp-1",
            "transport": "tcp",
            "listener": "tcp",
            "channel": "main",
            "text": "hi",
        }
        tcp.send(b"\xff\x00\n")
        binary = json.loads(client.recv(timeout=TIMEOUT))
        assert base64.b64decode(binary["base64"]) == b"\xff\x00" and "text" not in binary
        client.send(json.dumps({"type": "message", "text": "enveloped"}))
        assert tcp.line() == b"enveloped"
        client.send("raw text from a json client")
        assert tcp.line() == b"raw text from a json client"
        tcp.close()
        leave = json.loads(client.recv(timeout=TIMEOUT))
        assert (leave["type"], leave["peer"], leave["count"]) == ("leave", "tcp-1", 1)


def test_page_is_served_at_root(gw):
    port = gw.ports["ws"]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        response = read_until_closed(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert re.search(rb"(?i)content-type: text/html", head)
    assert b"<html" in body.lower()


def test_terminal_client_over_ws_and_wss(gw):
    tcp = Line(gw.ports["tcp"])
    ws_client = gateway_client(ws_url(gw))
    wss_client = gateway_client(ws_url(gw, "wss"), "--ca", str(dev_ca(gw)))
    gw.wait_for("ws-1 connected")
    gw.wait_for("wss-1 connected")
    ws_client.send(b"typed into ws")
    assert tcp.line() == b"typed into ws"
    tcp.send(b"to both\n")
    assert wss_client.readline() == b"typed into ws\n"
    assert wss_client.readline() == b"to both\n"
    assert ws_client.readline() == b"to both\n"
    ws_client.finish()
    wss_client.finish()
    assert ws_client.proc.returncode == 0 and wss_client.proc.returncode == 0


def test_shipped_config_runs_on_a_fresh_checkout(run_gateway, tmp_path):
    """The README quick start: every listener of config.toml comes up, dev certs included."""
    shipped = (Path(__file__).parent.parent / "config.toml").read_text()
    text = re.sub(r"(?m)^port = \d+", "port = 0", shipped)  # never fixed ports in tests
    gw = run_gateway(text)
    assert set(gw.ports) == {"tcp", "tls", "udp", "dtls", "ws", "wss"}
    assert (tmp_path / "certs" / "ca.pem").exists()
    assert (tmp_path / "certs" / "server.key").stat().st_mode & 0o777 == 0o600
    tcp = Line(gw.ports["tcp"])
    assert tcp.line() == b"Welcome to the gateway, you are client number 1!"
    with websocket(gw, "wss") as client:
        client.send("quick start works")
        assert tcp.line() == b"quick start works"


class ServerFrames:
    """Reads a raw WebSocket's server frames: each whole, unmasked, unfragmented."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _need(self, size: int) -> None:
        while len(self.data) < size:
            chunk = self.sock.recv(1 << 16)
            assert chunk, f"closed inside a frame; have {self.data[:20]!r}"
            self.data += chunk

    def next(self) -> tuple[int, bytes]:
        """The next frame's opcode and payload."""
        self._need(2)
        first, second = self.data[0], self.data[1]
        assert first & 0xF0 == 0x80, f"not a FIN frame: {self.data[:20]!r}"
        assert not second & 0x80, "a masked server frame"
        length, start = second & 0x7F, 2
        if length == 126:
            self._need(4)
            length, start = struct.unpack("!H", self.data[2:4])[0], 4
        elif length == 127:
            self._need(10)
            length, start = struct.unpack("!Q", self.data[2:10])[0], 10
        self._need(start + length)
        payload = self.data[start : start + length]
        self.data = self.data[start + length :]
        return first & 0x0F, payload


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"%012d" % i + b"m" * 87 + b"\n" for i in range(start, stop))


STEP = 2000  # messages per publisher send: 200 KB, more than the subscriber's socket takes


def flood_pair(gw: GatewayProcess) -> tuple[socket.socket, socket.socket, ServerFrames]:
    """A raw ws client with a small receive buffer (so that the gateway's sends are often
    partial), attached, and a tcp publisher to flood it."""
    port = gw.ports["ws"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    websocket_upgrade(sock, host=f"127.0.0.1:{port}")
    gw.wait_for("ws-1 connected")
    publisher = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=TIMEOUT)
    return sock, publisher, ServerFrames(sock)


def test_a_flood_written_through_keeps_pings_pongs_and_the_close_handshake(run_gateway):
    """Fan-out bytes go straight to an idle ws socket; Autobahn's own frames (pongs, its
    pings, the close handshake) still arrive whole, in their place, and the close ends it."""
    gw = run_gateway(toml_listener("tcp") + toml_listener("ws", ping_interval=1))
    sock, publisher, frames = flood_pair(gw)
    expected = pongs = pings = step = 0
    while pings < 1 or step < 5:  # at least one of the gateway's pings (1 s), under the flood
        assert step < 2000, "no ping from the gateway"
        publisher.sendall(numbered(step * STEP, (step + 1) * STEP))
        sock.sendall(masked_frame(0x89, b"probe-%d" % step))
        step += 1
        while expected < step * STEP or pongs < step:
            opcode, payload = frames.next()
            if opcode == 0x1:
                assert payload == numbered(expected, expected + 1)[:-1]
                expected += 1
            elif opcode == 0xA:
                assert payload == b"probe-%d" % pongs
                pongs += 1
            else:
                assert opcode == 0x9, (opcode, payload)
                pings += 1
                sock.sendall(masked_frame(0x8A, payload))
    # The client closes in the middle of the next step: the rest of what was sent before
    # the gateway's answer, then its close frame, then the end of the connection.
    publisher.sendall(numbered(step * STEP, (step + 1) * STEP))
    sock.sendall(masked_frame(0x88, struct.pack("!H", 1000)))
    while True:
        opcode, payload = frames.next()
        if opcode == 0x8:
            break
        assert opcode in (0x1, 0x9), opcode
        if opcode == 0x1:
            assert payload == numbered(expected, expected + 1)[:-1]
            expected += 1
    assert payload[:2] == struct.pack("!H", 1000)
    assert frames.data == b"" and read_until_closed(sock) == b""
    gw.wait_for("ws-1 disconnected \\(closed by the peer, code 1000\\)")
    assert not [line for line in gw.log if "not reading" in line or "slow consumer" in line]
    publisher.close()
    sock.close()


def test_a_close_the_gateway_starts_under_a_flood_is_the_last_frame(run_gateway):
    """A protocol error mid-flood (invalid UTF-8): the gateway's close (1007) comes after
    whole frames only, nothing follows it, and the connection ends once the client answers."""
    gw = run_gateway(toml_listener("tcp") + toml_listener("ws"))
    sock, publisher, frames = flood_pair(gw)
    publisher.sendall(numbered(0, STEP))
    assert frames.next() == (0x1, numbered(0, 1)[:-1])
    sock.sendall(masked_frame(0x81, b"bad \xff\xfe text"))
    for start in range(STEP, 5 * STEP, STEP):  # the flood goes on
        publisher.sendall(numbered(start, start + STEP))
    expected = 1
    while (frame := frames.next())[0] == 0x1:
        assert frame[1] == numbered(expected, expected + 1)[:-1]
        expected += 1
    assert frame[0] == 0x8 and frame[1][:2] == struct.pack("!H", 1007)
    sock.sendall(masked_frame(0x88, frame[1][:2]))
    assert read_until_closed(sock) == b"" and frames.data == b""
    gw.wait_for("ws-1 disconnected \\(closed with code 1007")
    publisher.close()
    sock.close()
