"""The real ``gateway`` command, real sockets, real clients."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (
    GATEWAY,
    Datagram,
    GatewayProcess,
    Interactive,
    Line,
    free_port,
    gateway_client,
)
from tests.toml import toml_listener, toml_table

WELCOME = "hello {peer}, you are number {count} on {name}"
TCP_UDP = (
    toml_table("gateway", name="testgw")
    + toml_table("limits", max_message_bytes=1000)
    + toml_listener("tcp", welcome=WELCOME, quit_command="close")
    + toml_listener("udp", peer_timeout=60)
)


def test_tcp_peers_see_each_other_with_welcome_and_no_echo(run_gateway):
    gw = run_gateway(TCP_UDP)
    a = Line(gw.ports["tcp"])
    assert a.line() == b"hello tcp-1, you are number 1 on testgw"
    b = Line(gw.ports["tcp"])
    assert b.line() == b"hello tcp-2, you are number 2 on testgw"
    a.send(b"first\r\n\n\nsecond\n")
    assert b.lines(2) == [b"first", b"second"]
    b.send(b"back")  # no newline yet: nothing is relayed
    assert a.nothing_within(0.3)
    b.send(b"\n")
    assert a.line() == b"back"
    assert b.nothing_within(0.3), "the sender must not get its own message"


def test_tcp_and_udp_relay_both_ways(run_gateway):
    gw = run_gateway(TCP_UDP)
    tcp = Line(gw.ports["tcp"])
    tcp.line()
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")  # registers without relaying
    gw.wait_for(r"udp-1 joined from 127\.0\.0\.1:")
    assert tcp.nothing_within(0.2)
    tcp.send(b"to udp\n")
    assert udp.recv() == b"to udp\n"
    udp.send(b"to tcp\r\n")
    assert tcp.line() == b"to tcp"
    udp.send(b"\n")  # a bare newline refreshes without relaying
    assert tcp.nothing_within(0.2)


def test_udp_to_udp_one_datagram_per_message(run_gateway):
    gw = run_gateway(TCP_UDP)
    a, b = Datagram(gw.ports["udp"]), Datagram(gw.ports["udp"])
    a.send(b"")
    gw.wait_for("udp-1 joined")
    b.send(b"line one\nline two")  # one datagram is one message, newlines and all
    assert a.recv() == b"line one\nline two\n"
    assert b.nothing_within(0.2)


def test_echo_true_sends_messages_back_to_the_sender(run_gateway):
    gw = run_gateway(toml_listener("tcp", echo=True))
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    gw.wait_for("tcp-2 connected")
    a.send(b"ping\n")
    assert a.line() == b"ping"
    assert b.line() == b"ping"


def test_non_utf8_payloads_pass_unchanged(run_gateway):
    gw = run_gateway(TCP_UDP)
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    a.line(), b.line()
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    payload = bytes(range(256)).replace(b"\n", b"").replace(b"\r", b"")
    a.send(payload + b"\n")
    assert b.line() == payload
    assert udp.recv() == payload + b"\n"
    udp.send(b"\xff\xfe\x00binary")
    assert a.line() == b"\xff\xfe\x00binary"


def test_channels_are_kept_apart(run_gateway):
    gw = run_gateway(
        toml_listener("red", "tcp", channel="red")
        + toml_listener("blue", "tcp", channel="blue")
        + toml_listener("red-udp", "udp", channel="red")
    )
    red1, red2 = Line(gw.ports["red"]), Line(gw.ports["red"])
    blue = Line(gw.ports["blue"])
    red_udp = Datagram(gw.ports["red-udp"])
    red_udp.send(b"")
    gw.wait_for("red-udp-1 joined")
    gw.wait_for("blue-1 connected")
    gw.wait_for("red-2 connected")
    red1.send(b"for red\n")
    assert red2.line() == b"for red"
    assert red_udp.recv() == b"for red\n"
    blue.send(b"for blue\n")
    assert red1.nothing_within(0.3)
    assert red2.nothing_within(0.1)
    assert red_udp.nothing_within(0.1)


def test_quit_command_closes_only_that_connection(run_gateway):
    gw = run_gateway(TCP_UDP)
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    a.line(), b.line()
    a.send(b"before\nclose\nafter\n")
    assert b.line() == b"before"
    assert a.closed()
    assert b.nothing_within(0.3), "lines after the quit command must not be relayed"
    gw.wait_for("tcp-1 disconnected \\(quit command\\)")


def test_oversize_line_closes_the_sender_and_is_never_relayed(run_gateway):
    gw = run_gateway(TCP_UDP)  # max_message_bytes = 1000
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    a.line(), b.line()
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    a.send(b"x" * 1000 + b"\n" + b"accepted\n" + b"y" * 1001 + b"\n")
    assert b.line() == b"x" * 1000
    assert b.line() == b"accepted"
    assert udp.recv() == b"x" * 1000 + b"\n"
    assert udp.recv() == b"accepted\n"
    assert a.closed()
    assert b"too long" in a.buffer
    assert b.nothing_within(0.3)
    # A partial line that is already too long is refused before its newline comes.
    c = Line(gw.ports["tcp"])
    c.line()
    c.send(b"z" * 5000)
    assert c.closed()
    assert b.nothing_within(0.2)
    # Everyone else is unaffected.
    udp.send(b"still here")
    assert b.line() == b"still here"


def test_per_sender_order_over_10000_messages(run_gateway):
    gw = run_gateway(TCP_UDP)
    sender = Line(gw.ports["tcp"])
    sender.line()
    receivers = [Line(gw.ports["tcp"]) for _ in range(3)]
    for r in receivers:
        r.line()
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    count = 10_000
    got: dict[int, list[bytes]] = {}

    def read(index: int, receiver: Line) -> None:
        got[index] = receiver.lines(count)

    threads = [threading.Thread(target=read, args=(i, r)) for i, r in enumerate(receivers)]
    for t in threads:
        t.start()
    udp_got: list[bytes] = []
    # UDP has no flow control: send in steps the receiver confirms, so none is lost
    # for lack of a socket buffer (the gateway's ordering is what is under test).
    step = 200
    for start in range(0, count, step):
        sender.send(b"".join(b"msg %d\n" % i for i in range(start, start + step)))
        for _ in range(step):
            udp_got.append(udp.recv())
    for t in threads:
        t.join(timeout=30)
    expected = [b"msg %d" % i for i in range(count)]
    for index in range(3):
        assert got[index] == expected
    assert udp_got == [e + b"\n" for e in expected]


def test_udp_peer_expires_after_peer_timeout(run_gateway):
    gw = run_gateway(toml_listener("tcp") + toml_listener("udp", peer_timeout=0.5))
    tcp = Line(gw.ports["tcp"])
    udp = Datagram(gw.ports["udp"])
    udp.send(b"")
    gw.wait_for("udp-1 joined")
    tcp.send(b"while known\n")
    assert udp.recv() == b"while known\n"
    gw.wait_for(r"udp-1 left \(timed out\)")
    tcp.send(b"after expiry\n")
    assert udp.nothing_within(0.3)
    udp.send(b"")  # comes back as a new peer
    gw.wait_for("udp-2 joined")
    tcp.send(b"back again\n")
    assert udp.recv() == b"back again\n"


def test_oversize_udp_datagram_is_dropped(run_gateway):
    gw = run_gateway(TCP_UDP)  # max_message_bytes = 1000
    tcp = Line(gw.ports["tcp"])
    tcp.line()
    udp = Datagram(gw.ports["udp"])
    udp.send(b"u" * 1001)
    udp.send(b"u" * 1000 + b"\r\n")
    assert tcp.line() == b"u" * 1000
    assert tcp.nothing_within(0.2)


def test_ipv6_loopback_listener(run_gateway):
    if not socket.has_ipv6:
        pytest.fail("IPv6 is required on loopback")
    gw = run_gateway(
        toml_listener("tcp6", "tcp", host="::1") + toml_listener("udp6", "udp", host="::1")
    )
    assert gw.hosts["tcp6"] == "::1"
    a = Line(gw.ports["tcp6"], "::1")
    udp = Datagram(gw.ports["udp6"], "::1")
    udp.send(b"")
    gw.wait_for(r"udp6-1 joined from \[::1\]:")
    a.send(b"over six\n")
    assert udp.recv() == b"over six\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_status_0_and_closes_peers(run_gateway, sig):
    gw: GatewayProcess = run_gateway(TCP_UDP)
    a = Line(gw.ports["tcp"])
    a.line()
    started = time.monotonic()
    assert gw.stop(sig) == 0
    assert time.monotonic() - started < 5
    assert a.closed()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=1)


def test_port_in_use_exits_1_with_a_clear_message(tmp_path: Path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "busy.toml"
    config.write_text(toml_listener("tcp", port=port))
    result = subprocess.run(
        [*GATEWAY, "--config", str(config)], capture_output=True, timeout=20, text=True
    )
    holder.close()
    assert result.returncode == 1
    assert f'cannot listen on tcp 127.0.0.1:{port} (listener "tcp")' in result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_and_version(tmp_path: Path):
    config = tmp_path / "ok.toml"
    config.write_text(TCP_UDP)
    checked = subprocess.run(
        [*GATEWAY, "--config", str(config), "--check"], capture_output=True, timeout=20
    )
    assert checked.returncode == 0
    version = subprocess.run([*GATEWAY, "--version"], capture_output=True, timeout=20, text=True)
    assert version.returncode == 0
    assert version.stdout.startswith("gateway ")


def test_shipped_config_is_valid():
    shipped = Path(__file__).parent.parent / "config.toml"
    result = subprocess.run(
        [*GATEWAY, "--config", str(shipped), "--check"], capture_output=True, timeout=20
    )
    assert result.returncode == 0, result.stderr


def _client(url: str) -> Interactive:
    return gateway_client(url, "--keepalive", "0.2", stderr=subprocess.PIPE)


def test_terminal_clients_for_tcp_and_udp(run_gateway):
    gw = run_gateway(TCP_UDP)
    tcp_client = _client(f"tcp://127.0.0.1:{gw.ports['tcp']}")
    udp_client = _client(f"udp://localhost:{gw.ports['udp']}")
    gw.wait_for("tcp-1 connected")
    gw.wait_for("udp-1 joined")
    observer = Line(gw.ports["tcp"])
    observer.line()
    tcp_client.send(b"from the tcp client")
    assert observer.line() == b"from the tcp client"
    udp_client.send(b"from the udp client")
    assert observer.line() == b"from the udp client"
    observer.send(b"to both clients\n")
    tcp_client.wait_for(b"to both clients\n")
    udp_client.wait_for(b"to both clients\n")
    tcp_out = tcp_client.finish()  # end of input: the client exits
    udp_out = udp_client.finish()
    assert tcp_client.proc.returncode == 0 and udp_client.proc.returncode == 0
    assert b"to both clients\n" in tcp_out
    assert b"from the udp client\n" in tcp_out
    assert b"hello tcp-1" in tcp_out
    assert udp_out.count(b"to both clients\n") == 1
    assert b"from the tcp client\n" in udp_out


def test_terminal_client_exits_when_the_server_closes(run_gateway):
    gw = run_gateway(TCP_UDP)
    client = _client(f"tcp://127.0.0.1:{gw.ports['tcp']}")
    gw.wait_for("tcp-1 connected")
    client.send(b"close")
    client.finish()
    assert client.proc.returncode == 0


def test_terminal_client_reports_refused_connection():
    port = free_port()
    result = subprocess.run(
        [*GATEWAY, "client", f"tcp://127.0.0.1:{port}"],
        capture_output=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert b"cannot connect" in result.stderr


def test_python_m_gateway_matches_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], capture_output=True, timeout=20
    )
    assert result.returncode == 0
    assert b"--config" in result.stdout
