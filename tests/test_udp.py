"""The UDP listener in memory: peers from source addresses, expiry, framing, limits."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from gateway.bus import Bus
from gateway.config import DatagramListenerConfig, Limits
from gateway.message import Batch, Origin
from gateway.udp import DATAGRAM_FRAMER, DatagramListener


class FakeUDPTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.fail = False

    def write(self, datagram: bytes, addr: Any) -> None:
        if self.fail:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.sent.append((datagram, addr))


def make(
    limits: Limits | None = None, **overrides: Any
) -> tuple[DatagramListener, FakeUDPTransport, Clock]:
    values: dict[str, Any] = {
        "name": "udp",
        "type": "udp",
        "host": "127.0.0.1",
        "port": 0,
        "channel": "main",
        "echo": False,
        "peer_timeout": 60.0,
        "max_peers": 1024,
    }
    values.update(overrides)
    clock = Clock()
    listener = DatagramListener(Bus(), DatagramListenerConfig(**values), limits or Limits(), clock)
    transport = FakeUDPTransport()
    listener.transport = transport  # type: ignore[assignment]
    return listener, transport, clock


A, B, C = ("127.0.0.1", 1000), ("127.0.0.1", 2000), ("127.0.0.1", 3000)


def test_first_datagram_registers_and_messages_reach_other_peers_not_the_sender():
    listener, transport, _ = make()
    listener.datagramReceived(b"", A)
    assert transport.sent == []
    listener.datagramReceived(b"hi\n", B)
    assert transport.sent == [(b"hi\n", A)]
    assert listener.bus.peer_count == 2


def test_one_trailing_newline_or_crlf_is_removed():
    listener, transport, _ = make()
    listener.datagramReceived(b"", A)
    for raw in (b"a\n", b"b\r\n", b"c", b"d\n\n", b"e\r"):
        listener.datagramReceived(raw, B)
    assert [d for d, _ in transport.sent] == [b"a\n", b"b\n", b"c\n", b"d\n\n", b"e\r\n"]


def test_bare_newline_refreshes_without_relaying():
    listener, transport, clock = make(peer_timeout=10.0)
    listener.datagramReceived(b"", A)
    listener.datagramReceived(b"", B)
    clock.advance(8)
    listener.datagramReceived(b"\n", A)
    assert transport.sent == []
    clock.advance(8)  # B expired (16 s), A refreshed at 8 s
    assert set(listener.peers) == {A}
    clock.advance(3)
    assert set(listener.peers) == set()
    assert listener.bus.peer_count == 0


def test_oversize_datagram_is_dropped_and_counted():
    listener, transport, _ = make(Limits(max_message_bytes=5))
    listener.datagramReceived(b"", A)
    listener.datagramReceived(b"123456", B)
    listener.datagramReceived(b"12345\r\n", B)
    assert transport.sent == [(b"12345\n", A)]
    assert listener.bus.metrics.dropped["oversize"] == 1


def test_a_message_too_large_for_a_datagram_is_dropped_for_udp_receivers_only():
    listener, transport, _ = make()
    listener.datagramReceived(b"", A)
    listener.datagramReceived(b"", B)
    origin = Origin("tcp-1", "tcp", "tcp")
    sender = listener.peers[A]
    huge = b"h" * 70_000
    framed = DATAGRAM_FRAMER.frame(Batch(origin, "main", [b"small", huge, b"after"]))
    assert framed == ([b"small\n", b"after\n"], 1, 0)
    listener.bus.publish(sender, Batch(sender.origin, "main", [b"small", huge, b"after"]))
    assert [d for d, _ in transport.sent] == [b"small\n", b"after\n"]
    assert listener.bus.metrics.dropped["udp_too_large"] == 1


def test_max_peers_bounds_the_table():
    listener, transport, _ = make(max_peers=2)
    listener.datagramReceived(b"", A)
    listener.datagramReceived(b"", B)
    listener.datagramReceived(b"intruder", C)
    assert set(listener.peers) == {A, B}
    assert transport.sent == []
    assert listener.bus.metrics.dropped["udp_max_peers"] == 1


def test_send_errors_are_counted_not_raised():
    listener, transport, _ = make()
    listener.datagramReceived(b"", A)
    transport.fail = True
    listener.datagramReceived(b"x", B)
    assert listener.bus.metrics.dropped["udp_send_error"] == 1
    assert set(listener.peers) == {A, B}


def test_echo_listener_returns_messages_to_the_sender():
    listener, transport, _ = make(echo=True)
    listener.datagramReceived(b"me", A)
    assert transport.sent == [(b"me\n", A)]


def test_stopping_forgets_every_peer():
    listener, _, clock = make()
    listener.datagramReceived(b"", A)
    listener.datagramReceived(b"", B)
    listener.stopProtocol()
    assert listener.bus.peer_count == 0
    assert clock.getDelayedCalls() == []
