"""Binary stream peers against the real ``gateway`` command: ``socat`` piping bytes, a
length-prefixed device over mutual TLS, and a browser-side WebSocket seeing them."""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path

from tests.conftest import TIMEOUT, Line, make_certs, websocket
from tests.toml import toml_listener, toml_table

SOCAT = shutil.which("socat") or "socat"


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


def read_u32(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!I", read_exactly(sock, 4))
    return read_exactly(sock, length)


def u32(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def test_socat_as_a_chunks_peer_reaches_a_websocket_client_as_binary_and_back(run_gateway):
    gw = run_gateway(toml_listener("tcp", framing="chunks") + toml_listener("ws", ping_interval=0))
    browser = websocket(gw)
    piped = subprocess.Popen(
        [SOCAT, "-", f"TCP:127.0.0.1:{gw.ports['tcp']}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        gw.wait_for("tcp-1 connected")
        assert piped.stdin is not None and piped.stdout is not None
        data = bytes(range(256))  # a newline, a zero byte, invalid UTF-8: all just bytes
        piped.stdin.write(data)
        piped.stdin.flush()
        received = b""
        while len(received) < len(data):
            message = browser.recv(timeout=TIMEOUT)
            assert isinstance(message, bytes), "binary frames, never text"
            received += message
        assert received == data
        browser.send(b"\x00back\nto the pipe\xff")
        browser.send("and text")
        wanted = b"\x00back\nto the pipe\xffand text"
        assert read_fd(piped.stdout.fileno(), len(wanted)) == wanted  # nothing added
    finally:
        piped.kill()
        piped.wait(TIMEOUT)
        browser.close()


def read_fd(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        assert ready, f"only {data!r} arrived"
        chunk = os.read(fd, size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_a_u32_device_over_mutual_tls_reaches_every_transport_and_back(run_gateway, tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs, "--client", "alice")
    gw = run_gateway(
        toml_table("limits", max_message_bytes=1000)
        + toml_listener("tls", certs=certs, client_ca=certs / "ca.pem", framing="u32")
        + toml_listener("tcp")
        + toml_listener("ws", ping_interval=0)
    )
    device = tls_device(gw.ports["tls"], certs)
    lines = Line(gw.ports["tcp"])
    browser = websocket(gw)
    gw.wait_for(r"tls-1:alice connected")
    gw.wait_for("ws-1 connected")
    frame = b"\x01\x02\n\x00\xfe"
    device.sendall(u32(frame) + u32(b"") + u32(b"status ok"))
    assert browser.recv(timeout=TIMEOUT) == frame
    assert browser.recv(timeout=TIMEOUT) == b"status ok"
    # A lines peer: the payload plus "\n" (the newline inside it is the payload's own).
    assert lines.lines(3) == [b"\x01\x02", b"\x00\xfe", b"status ok"]
    lines.send(b"set 42\n")
    assert read_u32(device) == b"set 42"
    browser.send("from the page")
    assert read_u32(device) == b"from the page"
    # A length over max_message_bytes: the connection is cut, nothing of it relayed.
    device.sendall(struct.pack("!I", 1001) + b"x" * 100)
    gw.wait_for("sent a message of at least 1001 bytes")
    assert device.recv(65536) == b""  # closed, with no text written into the stream
    device.close()
    gw.wait_for(r"tls-1:alice disconnected \(message too long: 1001 bytes, limit 1000\)")
    browser.close()


def tls_device(port: int, certs: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(str(certs / "alice.pem"), str(certs / "alice.key"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return context.wrap_socket(raw, server_hostname="localhost")
