"""Hostile peers against the real ``gateway`` command.

Garbage on every port (tcp, tls, udp, ws, wss; before and after each
handshake), broken WebSocket frames, half-open and reset connections. In
every case the offending peer is dropped by the gateway (or its datagram
ignored) while the hostile client itself keeps its end open; an honest TCP
peer and an honest ``websockets`` client hear nothing of it and still talk to
each other afterwards; the gateway stays up and logs no error.

To prove that nothing was relayed without sleeping, each test first waits for
the gateway to log the drop, then has the honest peers exchange a line: had
any garbage been relayed, it would have arrived before that line.

One gateway serves the whole module (starting one per test would double the
run time); each test looks only at the log lines written since it began.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from gateway.transports.datagram.wire import CHALLENGE, CHALLENGE_SIZE, hello, response
from tests.conftest import (
    JSON_SUBPROTOCOL,
    TIMEOUT,
    Datagram,
    GatewayProcess,
    Line,
    close_code,
    make_certs,
    masked_frame,
    read_until_closed,
    start_gateway,
    tls_context,
    websocket,
    websocket_upgrade,
)
from tests.toml import toml_listener, toml_table

MAX_MESSAGE = 1000


def config(certs: Path) -> str:
    return (
        toml_table("limits", handshake_timeout=1.0, max_message_bytes=MAX_MESSAGE)
        + toml_listener("tcp")
        + toml_listener("tls", certs=certs)
        + toml_listener("udp", challenge=True, peer_timeout=5.0)
        + toml_listener("ws")
        + toml_listener("wss", certs=certs)
    )


TROUBLE = re.compile(r"Traceback|Unhandled|\[critical\]|\[error\]")
DROP_WITHIN = 3.0
"""Seconds for the gateway to drop a peer: three times limits.handshake_timeout."""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("hostile")
    certs = folder / "certs"
    make_certs(certs)
    gateway = start_gateway(folder / "gateway.toml", config(certs))
    try:
        yield gateway
    finally:
        gateway.stop()


class Net:
    """One test's view of the gateway: its log lines, its sockets, two honest peers."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.since = len(gw.log)
        self.opened: list[Any] = []
        self.tcp = self.line()
        self.tcp_id = self.peer_id(self.tcp.sock)
        self.ws = websocket(gw)
        self.opened.append(self.ws)
        self.ws_id = self.peer_id(self.ws.socket)
        self.rounds = 0

    # The log

    def log(self) -> list[str]:
        return self.gw.log[self.since :]

    def wait(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first line since the test began matching ``pattern``; waits for it."""
        return self.gw.wait_for(pattern, timeout, since=self.since)

    def peer_id(self, sock: socket.socket) -> str:
        """The id the gateway gave the connection of ``sock``, once it has joined the bus."""
        port = sock.getsockname()[1]
        return self.wait(rf"(\S+) connected from 127\.0\.0\.1:{port} \(").group(1)

    def gone(self, peer: str, reason: str) -> None:
        """The gateway has dropped ``peer`` (the client has not closed its end)."""
        self.wait(rf"\b{peer} disconnected \({reason}", timeout=DROP_WITHIN)

    def on_the_bus(self) -> list[str]:
        """The peer ids the gateway lists to a new JSON client."""
        with websocket(self.gw, subprotocols=[JSON_SUBPROTOCOL]) as viewer:
            welcome = json.loads(viewer.recv(timeout=TIMEOUT))
        return [entry["peer"] for entry in welcome["peers"]]

    # Connections, all closed when the test ends

    def raw(self, listener: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.gw.ports[listener]), timeout=TIMEOUT)
        self.opened.append(sock)
        return sock

    def tls(self, listener: str) -> ssl.SSLSocket:
        wrapped = tls_context(self.gw).wrap_socket(self.raw(listener), server_hostname="localhost")
        self.opened.append(wrapped)
        return wrapped

    def line(self) -> Line:
        line = Line(self.gw.ports["tcp"])
        self.opened.append(line.sock)
        return line

    def websocket(self, **kwargs: Any) -> ClientConnection:
        client = websocket(self.gw, **kwargs)
        self.opened.append(client)
        return client

    def close(self) -> None:
        for sock in reversed(self.opened):
            sock.close()

    # The honest peers

    def got(self, lines: list[bytes]) -> None:
        """Both honest peers received exactly ``lines``, in order (WebSocket: text if UTF-8)."""
        assert self.tcp.lines(len(lines)) == lines
        for line in lines:
            try:
                expected: str | bytes = line.decode("utf-8")
            except UnicodeDecodeError:
                expected = line
            assert self.ws.recv(timeout=TIMEOUT) == expected

    def healthy(self) -> None:
        """The honest peers talk, each hearing the other first; the gateway lives, logs no error."""
        self.rounds += 1
        line = f"honest tcp {self.rounds}"
        self.tcp.send(line.encode() + b"\n")
        assert self.ws.recv(timeout=TIMEOUT) == line
        line = f"honest ws {self.rounds}"
        self.ws.send(line)
        assert self.tcp.line() == line.encode()
        assert self.tcp.nothing_within(0.1)
        with pytest.raises(TimeoutError):
            self.ws.recv(timeout=0.1)
        assert self.gw.proc.poll() is None
        trouble = [line for line in self.log() if TROUBLE.search(line)]
        assert not trouble, "\n".join(self.log())


@pytest.fixture
def net(gw: GatewayProcess) -> Iterator[Net]:
    view = Net(gw)
    try:
        yield view
    finally:
        view.close()


def dropped(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Read until the gateway closes the connection; what it sent first."""
    sock.settimeout(DROP_WITHIN)
    data = bytearray()
    try:
        read_until_closed(sock, into=data)
    except (ConnectionResetError, ssl.SSLError):
        pass
    except TimeoutError:
        raise AssertionError(
            f"the gateway kept the connection open; it sent {bytes(data[:100])!r}"
        ) from None
    return bytes(data)


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER on, timeout 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def random_without(*excluded: bytes, size: int = 4096) -> bytes:
    data = os.urandom(size)
    for byte in excluded:
        data = data.replace(byte, b"")
    return data


def line_model(data: bytes) -> list[bytes]:
    """The messages of a line stream: ``\\n`` ends one, one ``\\r`` goes, empty ones go."""
    lines = [raw[:-1] if raw.endswith(b"\r") else raw for raw in data.split(b"\n")[:-1]]
    return [line for line in lines if line]


# TCP


def too_long_a_line(net: Net, hostile: socket.socket) -> None:
    """Random bytes without a newline: the gateway drops the sender for a too long line."""
    peer = net.peer_id(hostile)
    hostile.sendall(random_without(b"\n"))
    said = dropped(hostile)
    assert said == b"" or said.startswith(b"gateway: message too long")
    net.gone(peer, "message too long")
    net.healthy()


def test_random_bytes_on_tcp_drop_the_sender_as_a_too_long_line(net):
    too_long_a_line(net, net.raw("tcp"))


def test_random_lines_on_tcp_arrive_exactly_as_sent(net):
    pieces = [random_without(b"\n", size=n) for n in (0, 1, 50, 300, 999, 17, 600)]
    stream = b"\n".join(pieces) + b"\r\n" + b"\n".join(reversed(pieces)) + b"\n"
    expected = line_model(stream)
    assert all(len(line) <= MAX_MESSAGE for line in expected)
    sender = net.line()
    net.peer_id(sender.sock)
    sender.send(stream)
    net.got(expected)
    net.healthy()


def test_half_open_and_reset_tcp_peers_do_not_disturb_the_others(net):
    # One that never reads and never closes for the whole test...
    silent = net.line()
    net.peer_id(silent.sock)
    # ...and one that vanishes with a reset instead of a FIN.
    vanishing = net.raw("tcp")
    peer = net.peer_id(vanishing)
    reset(vanishing)
    net.gone(peer, "connection lost")
    net.healthy()
    net.healthy()  # twice: the silent one is still there, still not reading


def test_a_reset_in_the_middle_of_a_line_relays_nothing_of_it(net):
    hostile = net.raw("tcp")
    peer = net.peer_id(hostile)
    hostile.sendall(b"complete line\n" + b"half of a long line " * 25)
    net.got([b"complete line"])
    reset(hostile)
    net.gone(peer, "connection lost")
    net.healthy()


# TLS


@pytest.mark.parametrize("listener", ["tls", "wss"])
def test_random_bytes_instead_of_a_client_hello(net, listener):
    hostile = net.raw(listener)
    address = rf"127\.0\.0\.1:{hostile.getsockname()[1]}"
    hostile.sendall(os.urandom(4096))
    said = dropped(hostile)
    assert not said.startswith(b"HTTP")  # a TLS alert at most
    if listener == "tls":
        net.wait(rf"{address} failed the handshake on listener \"tls\"")
    net.healthy()


def test_random_bytes_through_tls_drop_the_sender_as_a_too_long_line(net):
    too_long_a_line(net, net.tls("tls"))


def test_random_lines_through_tls_arrive_exactly_as_sent(net):
    sender = net.tls("tls")
    net.peer_id(sender)
    stream = b"\n".join(random_without(b"\n", size=n) for n in (5, 400, 999, 1)) + b"\n"
    sender.sendall(stream)
    net.got(line_model(stream))
    net.healthy()


def handshake_in_memory(sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS client over ``sock`` whose record layer we can bypass afterwards."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    if outgoing.pending:
        sock.sendall(outgoing.read())  # the client Finished
    return tls


def test_corrupt_tls_records_after_the_handshake_drop_the_peer(net, gw):
    hostile = net.raw("tls")
    handshake_in_memory(hostile, tls_context(gw))
    peer = net.peer_id(hostile)  # the gateway finished the handshake too
    hostile.sendall(os.urandom(4096))  # on the raw socket: not TLS records
    dropped(hostile)
    net.gone(peer, "connection lost")
    net.healthy()


# UDP


def test_random_datagrams_are_ignored_and_only_ever_answered_with_a_challenge(net, gw):
    hostile = Datagram(gw.ports["udp"])
    net.opened.append(hostile)
    answered = 0
    for size in (0, 1, 46, CHALLENGE_SIZE, 300, MAX_MESSAGE, MAX_MESSAGE + 1, 65507):
        datagram = os.urandom(size)
        if size in (300, MAX_MESSAGE):
            datagram = datagram[:100] + b"\n\r\n" + datagram[103:]  # newlines inside too
        hostile.send(datagram)
        payload = datagram
        if payload.endswith(b"\n"):  # one trailing newline is not part of the message
            payload = payload[:-2] if payload.endswith(b"\r\n") else payload[:-1]
        # An unverified source gets at most one challenge, never more than it sent.
        answered += size >= CHALLENGE_SIZE and len(payload) <= MAX_MESSAGE
    hostile.send(hello())  # answered last, so every datagram above has been handled
    for _ in range(answered + 1):
        reply = hostile.recv()
        assert reply.startswith(CHALLENGE) and len(reply) == CHALLENGE_SIZE
    assert hostile.nothing_within(0.1)
    # The listener still serves: a source that proves its address joins and is relayed.
    hostile.send(response(reply[len(CHALLENGE) :]))
    net.wait(rf"udp-\d+ joined from 127\.0\.0\.1:{hostile.sock.getsockname()[1]} ")
    hostile.send(b"verified at last\n")
    net.got([b"verified at last"])
    net.healthy()


# WebSocket, before the upgrade


def test_random_bytes_instead_of_an_http_request_are_refused(net):
    hostile = net.raw("ws")
    hostile.sendall(os.urandom(4096) + b"\r\n\r\n")
    said = dropped(hostile)
    assert said == b"" or re.match(rb"HTTP/1\.[01] [45]\d\d ", said), said[:100]
    net.healthy()


def test_incomplete_requests_are_dropped_at_the_handshake_timeout(net):
    half = net.raw("ws")
    half.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    endless = net.raw("ws")
    endless.sendall(random_without(b"\n", b"\r"))  # a first line that never ends
    for sock in (half, endless):
        assert dropped(sock) == b""
        port = sock.getsockname()[1]
        net.wait(rf"127\.0\.0\.1:{port} sent no complete request within 1 s; dropping")
    net.healthy()


# WebSocket, after the upgrade


def upgraded(net: Net, listener: str) -> tuple[Any, str]:
    """A raw socket (TLS for wss) that has completed the WebSocket handshake, and its id."""
    sock: Any = net.tls(listener) if listener == "wss" else net.raw(listener)
    websocket_upgrade(sock)
    return sock, net.peer_id(sock)


def garbage_frames() -> bytes:
    data = os.urandom(4096)
    # RSV1 set, no extension negotiated: whatever follows, the first frame is a
    # protocol error (else ~1% of random headers would make a valid message).
    return bytes([data[0] | 0x40]) + data[1:]


HOSTILE_FRAMES = {
    "random bytes": (garbage_frames, 1002),
    "unmasked frame": (lambda: struct.pack("!BB", 0x81, 5) + b"hello", 1002),
    "2**62 byte frame": (lambda: masked_frame(0x82, b"", length=2**62), 1009),
    "invalid UTF-8 text": (lambda: masked_frame(0x81, b"caf\xc3 \xff\xfe"), 1007),
    "over max_message_bytes": (lambda: masked_frame(0x82, bytes(MAX_MESSAGE + 1)), 1009),
    "fragmented ping": (lambda: masked_frame(0x09, b"ping"), 1002),
}


@pytest.mark.parametrize(
    ("listener", "case"),
    [("ws", case) for case in HOSTILE_FRAMES]
    + [("wss", "unmasked frame"), ("wss", "random bytes")],
)
def test_hostile_frames_are_refused_with_a_close_code_and_dropped(net, listener, case):
    frames, expected = HOSTILE_FRAMES[case]
    hostile, peer = upgraded(net, listener)
    hostile.sendall(frames())
    # failByDrop is off: the gateway says why (a close frame)...
    assert close_code(hostile) == expected
    # ...and drops the peer, even though this client never answers nor closes.
    net.gone(peer, f"closed with code {expected}")
    net.healthy()


@pytest.mark.parametrize("listener", ["ws", "wss"])
def test_a_client_that_closes_but_holds_the_connection_is_dropped(net, listener):
    hostile, peer = upgraded(net, listener)
    hostile.sendall(masked_frame(0x88, struct.pack("!H", 1000)))  # a close frame...
    assert close_code(hostile) == 1000  # ...answered; the client never closes its end
    try:
        net.gone(peer, "closed by the peer, code 1000")
    finally:
        # Closed, it has left the bus: a new JSON client's welcome does not list it.
        assert peer not in net.on_the_bus()
    net.healthy()


def test_a_websocket_client_reset_mid_frame_relays_nothing_of_it(net):
    client = net.websocket()
    peer = net.peer_id(client.socket)
    client.send("a whole message first")
    net.got([b"a whole message first"])
    frame = masked_frame(0x81, b"half of this message never arrives" * 10)
    client.socket.sendall(frame[: len(frame) // 2])
    reset(client.socket)
    net.gone(peer, "connection lost")
    net.healthy()
