"""UDP abuse: the allow list, the address challenge, the rate limit, reserved control datagrams.

In memory first (the real gateway on a ``MemoryGateway``, and the client on a fake
transport and a ``Clock``), then a few real-socket tests against the ``gateway``
command, including forged source addresses sent through a raw socket.
"""

from __future__ import annotations

import io
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from gateway.cli.client import _DatagramClient
from gateway.core.message import Batch, Origin
from gateway.transports.datagram.wire import (
    CHALLENGE_SIZE,
    CONTROL_PREFIX,
    hello,
    parse_control,
    response,
)
from tests.conftest import GATEWAY, Datagram, GatewayProcess, Line
from tests.test_udp import Udp, make, stop_all

Address = tuple[str, int]
A, B = ("127.0.0.1", 1000), ("127.0.0.1", 2000)


@pytest.fixture(autouse=True)
def _stop_gateways() -> Iterator[None]:
    yield
    stop_all()


def cookie_from(datagram: bytes) -> bytes:
    verb, cookie = parse_control(datagram) or (b"", b"")
    assert verb == b"challenge", datagram
    return cookie


def verify(udp: Udp, address: Address) -> None:
    """Do the exchange for ``address`` and drop the challenge from ``udp.sent``."""
    sent = len(udp.sent)
    udp.send(hello(), address)
    [(challenge, to)] = udp.sent[sent:]
    assert to == address
    del udp.sent[sent:]
    udp.send(response(cookie_from(challenge)), address)
    assert address in udp.peers


def warnings(udp: Udp, since: int = 0) -> list[Any]:
    """The warnings the gateway logged (from its ``since``-th log event on)."""
    events = list(udp.gateway.log_events())[since:]
    return [e for e in events if e["log_level"] == LogLevel.warn]


def logged(udp: Udp) -> int:
    """How many events the gateway has logged so far (a mark for ``warnings``)."""
    return len(list(udp.gateway.log_events()))


# The allow list


def test_sources_outside_allow_are_ignored_and_counted():
    udp = make(allow=("127.0.0.1/32", "10.0.0.0/8"))
    udp.send(b"", A)
    for source in (("127.0.0.2", 5), ("192.168.1.1", 5), ("::1", 5)):
        udp.send(b"", source)
        udp.send(b"let me in", source)
        udp.send(hello(), source)
    assert udp.sent == []
    assert set(udp.peers) == {A}
    assert udp.bus.metrics.dropped["udp_not_allowed"] == 9
    assert udp.gateway.reactor.getDelayedCalls() == [udp.peers[A].expiry]
    udp.send(b"from ten", ("10.1.2.3", 7))
    assert udp.sent == [(b"from ten\n", A)]


def test_ipv4_mapped_sources_are_matched_as_ipv4():
    udp = make(allow=("127.0.0.1/32",))
    udp.send(b"", ("::ffff:127.0.0.1", 1000))
    udp.send(b"", ("::ffff:127.0.0.2", 1000))
    udp.send(b"", ("::ffff:10.0.0.1", 1000))
    assert set(udp.peers) == {("::ffff:127.0.0.1", 1000)}
    assert udp.bus.metrics.dropped["udp_not_allowed"] == 2
    default = make()  # loopback only: ::ffff:127.x is loopback
    default.send(b"", ("::ffff:127.0.0.9", 1000))
    default.send(b"", ("::ffff:192.0.2.1", 1000))
    assert set(default.peers) == {("::ffff:127.0.0.9", 1000)}


def test_the_allow_list_is_consulted_only_for_sources_that_are_not_peers(
    monkeypatch: pytest.MonkeyPatch,
):
    udp = make()
    checked: list[str] = []
    allowed_ip = udp.server._allowed_ip

    def counting(host: str) -> Any:
        checked.append(host)
        return allowed_ip(host)

    monkeypatch.setattr(udp.server, "_allowed_ip", counting)
    udp.send(b"", A)
    for n in range(100):
        udp.send(b"%d" % n, A)
    assert checked == ["127.0.0.1"]


# The challenge


def test_a_datagram_shorter_than_the_challenge_gets_no_answer():
    udp = make(challenge=True)
    for datagram in (b"", b"\n", CONTROL_PREFIX + b" hello", hello(CHALLENGE_SIZE - 1), b"hi"):
        udp.send(datagram, A)
    assert udp.sent == []
    assert udp.peers == {}
    assert udp.bus.metrics.dropped["udp_challenge_short"] == 4
    assert udp.bus.metrics.dropped["udp_unverified"] == 1


def test_a_padded_hello_gets_exactly_one_challenge_no_longer_than_itself():
    udp = make(challenge=True)
    udp.send(hello(CHALLENGE_SIZE), A)
    [(challenge, to)] = udp.sent
    assert to == A
    assert len(challenge) == CHALLENGE_SIZE == 47
    assert challenge.startswith(b"\x00GW1 challenge ")
    bytes.fromhex(cookie_from(challenge).decode())  # 32 hex digits
    udp.send(hello(), B)  # the client's 64-byte hello
    assert len(udp.sent) == 2
    assert len(udp.sent[1][0]) <= 64
    assert udp.peers == {}


def test_the_right_cookie_makes_a_peer_and_its_messages_are_relayed_both_ways():
    udp = make(challenge=True)
    verify(udp, A)
    verify(udp, B)
    assert udp.sent == []
    udp.send(b"from b", B)
    udp.send(b"from a\n", A)
    assert udp.sent == [(b"from b\n", A), (b"from a\n", B)]
    outsider = Origin("tcp-1", "tcp", "tcp")
    udp.bus.publish(udp.peers[A], Batch(outsider, "main", [b"bus"]))
    assert udp.sent[-1] == (b"bus\n", B)


def test_wrong_cookies_are_refused_silently():
    udp = make(challenge=True)
    udp.send(hello(), A)
    right = cookie_from(udp.sent.pop()[0])
    wrong = bytes([right[0] ^ 1]) + right[1:]
    for cookie in (wrong, b"0" * 32, b"zz" * 16, right[:-1], b""):
        udp.send(response(cookie), A)
    udp.send(response(right), B)  # another port's cookie
    udp.send(response(right), ("127.0.0.2", 1000))  # another host's
    assert udp.peers == {}
    assert udp.sent == []
    assert udp.bus.metrics.dropped["udp_bad_cookie"] == 7


def test_cookies_last_their_window_and_the_next_then_expire():
    udp = make(challenge=True)
    udp.advance(29)  # late in window 0
    udp.send(hello(), A)
    cookie = cookie_from(udp.sent.pop()[0])
    udp.advance(2)  # window 1: the previous window's cookie still counts
    udp.send(response(cookie), A)
    assert A in udp.peers

    udp.send(hello(), B)
    old = cookie_from(udp.sent.pop()[0])  # window 1
    udp.advance(30)  # window 2: still fine
    udp.advance(29)  # t = 90: window 3, expired
    udp.send(response(old), B)
    assert B not in udp.peers
    assert udp.bus.metrics.dropped["udp_bad_cookie"] == 1


def test_a_new_listener_does_not_accept_another_listeners_cookies():
    first = make(challenge=True, listeners=2)
    beside = Udp(first.gateway, "udp2")  # another listener of the same gateway
    restarted = make(challenge=True)  # the same listener in a new run
    first.send(hello(), A)
    cookie = cookie_from(first.sent[0][0])
    for other in (beside, restarted):
        other.send(response(cookie), A)
        assert other.peers == {}
    first.send(response(cookie), A)
    assert A in first.peers


def test_messages_from_unverified_sources_are_dropped_and_long_ones_challenged():
    udp = make(challenge=True)
    verify(udp, A)
    udp.send(b"short", B)
    udp.send(b"m" * 100, B)
    assert [(len(d), to) for d, to in udp.sent] == [(CHALLENGE_SIZE, B)]
    assert udp.bus.metrics.dropped["udp_unverified"] == 2
    assert B not in udp.peers


def test_an_expired_peer_must_do_the_exchange_again():
    udp = make(challenge=True, peer_timeout=10.0)
    verify(udp, A)
    verify(udp, B)
    udp.advance(5)
    udp.send(b"", A)  # any datagram refreshes a verified peer
    udp.advance(6)
    assert set(udp.peers) == {A}
    udp.send(b"after expiry", B)
    assert udp.sent == []
    verify(udp, B)
    udp.send(b"again", B)
    assert udp.sent == [(b"again\n", A)]


def test_unverified_sources_cost_no_memory():
    udp = make(challenge=True)
    server = udp.server

    def sizes() -> list[int]:
        holders = [
            vars(server),
            vars(server.warnings),
            vars(server.runtime),
            vars(udp.bus),
            vars(udp.bus.metrics),
        ]
        return [
            len(value)
            for holder in holders
            for value in holder.values()
            if isinstance(value, dict | set | list)
        ]

    for port in range(1, 101):
        udp.send(hello(), ("127.0.0.5", port))
        udp.send(b"x", ("127.0.0.6", port))
    before = sizes()
    for port in range(101, 10_101):
        udp.send(hello(), ("127.0.0.5", port))
        udp.send(b"x", ("127.0.0.6", port))
    assert sizes() == before
    assert udp.peers == {}
    assert udp.bus.peer_count == 0
    assert udp.gateway.reactor.getDelayedCalls() == []
    assert len(udp.sent) == 10_100  # one challenge per padded hello, nothing else
    assert {to[0] for _, to in udp.sent} == {"127.0.0.5"}


# Control datagrams


@pytest.mark.parametrize("challenge", [False, True])
def test_control_datagrams_are_never_relayed(challenge: bool):
    udp = make(challenge=challenge)
    for address in (A, B):
        if challenge:
            verify(udp, address)
        else:
            udp.send(b"", address)
    for datagram in (
        hello(),
        CONTROL_PREFIX,
        CONTROL_PREFIX + b" hello",
        CONTROL_PREFIX + b" response " + b"0" * 32,
        CONTROL_PREFIX + b" challenge " + b"0" * 32 + b"\n",
        CONTROL_PREFIX + b" anything else",
    ):
        udp.send(datagram, B)
    assert udp.sent == []


def test_with_challenge_off_a_hello_registers_and_refreshes_like_an_empty_datagram():
    udp = make(peer_timeout=10.0)
    udp.send(hello(), A)
    udp.send(CONTROL_PREFIX + b" hello", B)  # unpadded is fine here
    assert set(udp.peers) == {A, B}
    assert udp.sent == []
    udp.advance(8)
    udp.send(hello(), A)
    udp.advance(8)
    assert set(udp.peers) == {A}


def test_messages_that_look_like_control_datagrams_never_reach_udp_receivers():
    udp = make()
    udp.send(b"", A)
    udp.send(b"", B)
    sender = Origin("tcp-1", "tcp", "tcp")
    fake = b"\x00GW1 challenge " + b"0" * 32
    udp.bus.publish(udp.peers[A], Batch(sender, "main", [b"before", fake, b"\x00GW1", b"after"]))
    assert udp.sent == [(b"before\n", B), (b"after\n", B)]
    assert udp.bus.metrics.dropped["udp_reserved"] == 2


# The rate limit


def test_rate_limit_drops_over_the_burst_and_recovers():
    udp = make({"max_messages_per_second": 5})
    udp.send(b"", A)
    for n in range(8):
        udp.send(b"", B)  # neither empty nor control datagrams count
        udp.send(hello(), B)
        udp.send(b"m%d" % n, B)
    assert [d for d, _ in udp.sent] == [b"m%d\n" % n for n in range(5)]
    assert udp.bus.metrics.dropped["rate_limit"] == 3
    udp.advance(0.2)  # one token back
    udp.send(b"one", B)
    udp.send(b"too many", B)
    udp.advance(1)
    for n in range(6):
        udp.send(b"r%d" % n, B)
    sent = [d for d, _ in udp.sent[5:]]
    assert sent == [b"one\n"] + [b"r%d\n" % n for n in range(5)]
    assert udp.bus.metrics.dropped["rate_limit"] == 5


def test_without_a_rate_limit_peers_have_no_bucket():
    udp = make()
    udp.send(b"", A)
    assert udp.peers[A].bucket is None


# Logging


def test_wide_allow_without_challenge_warns_once_at_start():
    cases: list[tuple[dict[str, Any], bool]] = [
        ({"allow": ("0.0.0.0/0",)}, True),
        ({"allow": ("127.0.0.1/32", "::/0")}, True),
        ({"allow": ("0.0.0.0/0",), "challenge": True}, False),
        ({}, False),
        ({"allow": ("127.0.0.2/32", "::1/128", "::ffff:127.0.0.1/128")}, False),
    ]
    for overrides, warned in cases:
        udp = make(**overrides)  # the gateway starts (listens) at once
        found = warnings(udp)
        if warned:
            [event] = found
            text = event["log_format"]
            assert "reflector" in text and "challenge = true" in text
        else:
            assert found == [], overrides
        stop_all()  # before the next case starts: one gateway's log at a time


def test_dropped_datagram_logging_is_bounded():
    udp = make(allow=("10.0.0.0/8",), challenge=True)
    mark = logged(udp)
    for port in range(1, 1001):
        udp.send(b"x", ("192.0.2.1", port))
        udp.send(b"", ("10.0.0.1", port))
    udp.advance(1)
    udp.send(b"x", ("192.0.2.1", 1))
    found = [e["log_format"] for e in warnings(udp, mark)]
    assert len(found) == 3  # not allowed, too short, then not allowed again
    assert "suppressed" in found[-1]
    assert udp.bus.metrics.dropped["udp_not_allowed"] == 1001


# The terminal client, in memory


class FakeUDPTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, addr: Any) -> None:
        self.sent.append((datagram, addr))


class ClientHarness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.out = io.BytesIO()
        self.done: Deferred[int] = Deferred()
        self.client = _DatagramClient(self.clock, ("127.0.0.1", 9), self.out, self.done, 0)
        self.transport = FakeUDPTransport()
        self.client.transport = self.transport  # type: ignore[assignment]
        self.client._grace = self.clock.callLater(
            _DatagramClient.HANDSHAKE_GRACE, self.client._ready
        )

    def sent(self) -> list[bytes]:
        return [d for d, _ in self.transport.sent]


def test_client_answers_a_challenge_and_never_prints_control_datagrams():
    h = ClientHarness()
    h.client._send_line(b"early line")
    assert h.sent() == []  # held until the gateway's choice is known
    cookie = b"ab" * 16
    h.client.datagramReceived(b"\x00GW1 challenge " + cookie, ("127.0.0.1", 9))
    assert h.sent() == [b"\x00GW1 response " + cookie, b"early line"]
    h.client.datagramReceived(b"\x00GW1 something new", ("127.0.0.1", 9))
    h.client.datagramReceived(b"bus message\n", ("127.0.0.1", 9))
    assert h.out.getvalue() == b"bus message\n"
    assert h.clock.getDelayedCalls() == []


def test_client_against_a_gateway_without_challenge_sends_held_lines_after_the_grace():
    h = ClientHarness()
    h.client._send_line(b"one")
    h.client._send_line(b"two")
    h.client._end()
    assert h.sent() == [] and not h.done.called
    h.clock.advance(_DatagramClient.HANDSHAKE_GRACE)
    assert h.sent() == [b"one", b"two"]
    assert h.done.called


def test_client_and_listener_complete_the_exchange_in_memory():
    udp = make(challenge=True)
    verify(udp, A)
    h = ClientHarness()
    me = ("127.0.0.1", 4242)

    def pump() -> None:
        while True:
            out, h.transport.sent = h.transport.sent, []
            for datagram, _ in out:
                udp.send(datagram, me)
            replies = udp.port.received(me)
            for datagram in replies:
                h.client.datagramReceived(datagram, ("127.0.0.1", 9))
            if not out and not replies:
                return

    h.client._register()
    h.client._send_line(b"hi")
    pump()
    assert me in udp.peers
    assert udp.port.received(A) == [b"hi\n"]
    udp.send(b"welcome", A)
    pump()
    assert h.out.getvalue() == b"welcome\n"
    assert udp.bus.metrics.messages_received["udp", "udp"] == 2  # "hi" and "welcome"


# Real sockets: the gateway command, forged sources through a raw socket


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forged_udp(source: tuple[str, int], target: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 packet carrying a UDP datagram from ``source`` (whoever really sends it)."""
    src, dst = socket.inet_aton(source[0]), socket.inet_aton(target[0])
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    header = struct.pack("!HHHH", source[1], target[1], length, 0)
    checksum = _checksum(pseudo + header + payload) or 0xFFFF
    udp_part = struct.pack("!HHHH", source[1], target[1], length, checksum) + payload
    # Version/IHL, TOS, total length, id, flags (DF), TTL, protocol, checksum (kernel fills).
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_UDP, 0)
    return ip + src + dst + udp_part


class Forger:
    """Sends datagrams with any IPv4 source address (needs root: a raw socket)."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except PermissionError as e:
            pytest.fail(f"raw sockets are required for the spoofing tests: {e}")

    def send(self, source: tuple[str, int], target: tuple[str, int], payload: bytes) -> None:
        self.sock.sendto(forged_udp(source, target, payload), (target[0], 0))

    def close(self) -> None:
        self.sock.close()


class Victim(Datagram):
    """A UDP socket on 127.0.0.2 whose address the forger uses."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.2", 0))
        self.sock.settimeout(10)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port


@pytest.fixture
def victim() -> Iterator[Victim]:
    v = Victim()
    yield v
    v.close()


@pytest.fixture
def forger() -> Iterator[Forger]:
    f = Forger()
    yield f
    f.close()


def verified_datagram(port: int) -> Datagram:
    """A UDP client on 127.0.0.1 that has done the challenge exchange."""
    d = Datagram(port)
    d.send(hello())
    d.send(response(cookie_from(d.recv())))
    return d


TCP_AND_UDP = """
[[listeners]]
name = "tcp"
type = "tcp"
port = 0

[[listeners]]
name = "udp"
type = "udp"
port = 0
"""


def test_forged_sources_get_no_bus_traffic_with_challenge(
    run_gateway: Callable[..., GatewayProcess], victim: Victim, forger: Forger
):
    gw = run_gateway(TCP_AND_UDP + "challenge = true\n")
    target = ("127.0.0.1", gw.ports["udp"])
    spoofed = victim.address
    forger.send(spoofed, target, b"\x00GW1 hello")  # 10 bytes: shorter than a challenge
    gw.wait_for(rf"from 127\.0\.0\.2:{spoofed[1]}: shorter than a challenge")
    forger.send(spoofed, target, b"\x00GW1 response " + b"0" * 32)
    gw.wait_for(rf"from 127\.0\.0\.2:{spoofed[1]}: a wrong or expired cookie")
    forger.send(spoofed, target, hello())  # padded: one challenge, no bigger
    challenge = victim.recv()
    assert challenge.startswith(b"\x00GW1 challenge ") and len(challenge) <= len(hello())

    tcp = Line(gw.ports["tcp"])
    real = verified_datagram(gw.ports["udp"])
    gw.wait_for(r"udp-1 joined from 127\.0\.0\.1:")
    tcp.send(b"".join(b"flood %d\n" % n for n in range(20)))
    assert [real.recv() for _ in range(20)][-1] == b"flood 19\n"
    assert victim.nothing_within(0.3)
    assert not any("joined from 127.0.0.2" in line for line in gw.log)


def test_forged_sources_outside_allow_are_ignored_entirely(
    run_gateway: Callable[..., GatewayProcess], victim: Victim, forger: Forger
):
    gw = run_gateway(TCP_AND_UDP + 'allow = ["127.0.0.1/32"]\n')
    target = ("127.0.0.1", gw.ports["udp"])
    spoofed = victim.address
    tcp = Line(gw.ports["tcp"])
    for payload in (b"", b"spoofed message", hello()):
        forger.send(spoofed, target, payload)
    gw.wait_for(rf"from 127\.0\.0\.2:{spoofed[1]}: its source is not in the allow list")
    real = Datagram(gw.ports["udp"])
    real.send(b"")
    gw.wait_for(r"udp-1 joined from 127\.0\.0\.1:")
    tcp.send(b"to every peer\n")
    assert real.recv() == b"to every peer\n"
    assert victim.nothing_within(0.3)
    assert tcp.nothing_within(0.05), "the spoofed message must not be relayed"
    assert not any("reflector" in line for line in gw.log)


def test_the_allow_list_ignores_a_real_client_outside_it(
    run_gateway: Callable[..., GatewayProcess],
):
    gw = run_gateway(TCP_AND_UDP + 'allow = ["127.0.0.2/32"]\n')
    tcp = Line(gw.ports["tcp"])
    client = Datagram(gw.ports["udp"])
    client.send(hello())
    client.send(b"let me in")
    gw.wait_for(r"ignored a datagram from 127\.0\.0\.1:\d+: its source is not in the allow list")
    tcp.send(b"anyone there?\n")
    assert client.nothing_within(0.3)
    assert tcp.nothing_within(0.05)
    assert not any("joined" in line for line in gw.log)


def test_terminal_client_completes_the_challenge_and_exchanges_lines(
    run_gateway: Callable[..., GatewayProcess],
):
    gw = run_gateway(TCP_AND_UDP + "challenge = true\n")
    tcp = Line(gw.ports["tcp"])
    client = subprocess.Popen(
        [*GATEWAY, "client", f"udp://127.0.0.1:{gw.ports['udp']}", "--keepalive", "0.2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"sent at once\n")  # held until the exchange is done
        client.stdin.flush()
        gw.wait_for(r"udp-1 joined from 127\.0\.0\.1:")
        assert tcp.line() == b"sent at once"
        tcp.send(b"to the client\n")
        assert client.stdout.readline() == b"to the client\n"
        client.stdin.write(b"from the client\n")
        client.stdin.flush()
        assert tcp.line() == b"from the client"
        rest, errors = client.communicate(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, errors
    assert b"GW1" not in rest
    assert "udp-2 joined" not in "\n".join(gw.log), "keepalive hellos only refresh"
