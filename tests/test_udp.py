"""The UDP listener in memory: peers from source addresses, expiry, framing, limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gateway.core.bus import Bus
from gateway.core.message import Batch, Origin
from gateway.testing import DatagramPort, MemoryGateway
from gateway.transports.datagram.framing import DATAGRAM_FRAMER
from gateway.transports.datagram.server import DatagramListener, DatagramServer

Address = tuple[str, int]
A, B, C = ("127.0.0.1", 1000), ("127.0.0.1", 2000), ("127.0.0.1", 3000)


class Udp:
    """The ``udp`` listener of a ``MemoryGateway``, and every datagram it sent."""

    def __init__(self, gateway: MemoryGateway, listener: str = "udp") -> None:
        self.gateway = gateway
        self.port: DatagramPort = gateway.datagrams(listener)
        service = gateway.listener(listener)
        assert isinstance(service, DatagramListener)
        self.server: DatagramServer = service.server

    def send(self, datagram: bytes, source: Address) -> None:
        """A datagram from ``source`` reaches the listener."""
        self.port.send(datagram, source)

    @property
    def sent(self) -> list[tuple[bytes, Address]]:
        """Every datagram the listener sent (and that no one took), in order, with its address."""
        return self.port.port.written

    @property
    def bus(self) -> Bus:
        return self.gateway.bus

    @property
    def peers(self) -> dict[Address, Any]:
        return self.server.peers

    def advance(self, seconds: float) -> None:
        """Move the gateway's clock by exactly ``seconds`` (UDP only: no bytes to move)."""
        self.gateway.reactor.advance(seconds)


_running: list[MemoryGateway] = []


def stop_all() -> None:
    """Stop every gateway ``make`` started (their log capture too)."""
    while _running:
        _running.pop().stop()


@pytest.fixture(autouse=True)
def _stop_gateways() -> Iterator[None]:
    yield
    stop_all()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(str(v)) for v in value) + "]"
    return repr(value)


def gateway_toml(limits: dict[str, Any] | None = None, listeners: int = 1, **keys: Any) -> str:
    """A gateway with ``listeners`` udp listeners (``udp``, ``udp2``...) set up with ``keys``."""
    text = ""
    if limits:
        text += "[limits]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in limits.items())
    for n in range(1, listeners + 1):
        name = "udp" if n == 1 else f"udp{n}"
        text += f'[[listeners]]\nname = "{name}"\ntype = "udp"\nport = {9000 + n}\n'
        text += "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
    return text


def make(limits: dict[str, Any] | None = None, listeners: int = 1, **keys: Any) -> Udp:
    """A gateway with one udp listener ``udp``: ``keys`` are its settings, ``limits`` the
    gateway's ``[limits]``."""
    gateway = MemoryGateway(gateway_toml(limits, listeners, **keys))
    _running.append(gateway)
    return Udp(gateway)


def test_first_datagram_registers_and_messages_reach_other_peers_not_the_sender():
    udp = make()
    udp.send(b"", A)
    assert udp.sent == []
    udp.send(b"hi\n", B)
    assert udp.sent == [(b"hi\n", A)]
    assert udp.bus.peer_count == 2


def test_one_trailing_newline_or_crlf_is_removed():
    udp = make()
    udp.send(b"", A)
    for raw in (b"a\n", b"b\r\n", b"c", b"d\n\n", b"e\r"):
        udp.send(raw, B)
    assert [d for d, _ in udp.sent] == [b"a\n", b"b\n", b"c\n", b"d\n\n", b"e\r\n"]


def test_bare_newline_refreshes_without_relaying():
    udp = make(peer_timeout=10.0)
    udp.send(b"", A)
    udp.send(b"", B)
    udp.advance(8)
    udp.send(b"\n", A)
    assert udp.sent == []
    udp.advance(8)  # B expired (16 s), A refreshed at 8 s
    assert set(udp.peers) == {A}
    udp.advance(3)
    assert set(udp.peers) == set()
    assert udp.bus.peer_count == 0


def test_oversize_datagram_is_dropped_and_counted():
    udp = make({"max_message_bytes": 5})
    udp.send(b"", A)
    udp.send(b"123456", B)
    udp.send(b"12345\r\n", B)
    assert udp.sent == [(b"12345\n", A)]
    assert udp.bus.metrics.dropped["oversize"] == 1


def test_a_message_too_large_for_a_datagram_is_dropped_for_udp_receivers_only():
    udp = make()
    udp.send(b"", A)
    udp.send(b"", B)
    origin = Origin("tcp-1", "tcp", "tcp")
    sender = udp.peers[A]
    huge = b"h" * 70_000
    framed = DATAGRAM_FRAMER.frame(Batch(origin, "main", [b"small", huge, b"after"]))
    assert framed == ([b"small\n", b"after\n"], 1, 0)
    udp.bus.publish(sender, Batch(sender.origin, "main", [b"small", huge, b"after"]))
    assert [d for d, _ in udp.sent] == [b"small\n", b"after\n"]
    assert udp.bus.metrics.dropped["udp_too_large"] == 1


def test_max_peers_bounds_the_table():
    udp = make(max_peers=2)
    udp.send(b"", A)
    udp.send(b"", B)
    udp.send(b"intruder", C)
    assert set(udp.peers) == {A, B}
    assert udp.sent == []
    assert udp.bus.metrics.dropped["udp_max_peers"] == 1


def test_send_errors_are_counted_not_raised(monkeypatch: pytest.MonkeyPatch):
    udp = make()
    udp.send(b"", A)

    def full(datagram: bytes, address: Address) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(udp.port.port, "write", full)
    udp.send(b"x", B)
    assert udp.bus.metrics.dropped["udp_send_error"] == 1
    assert set(udp.peers) == {A, B}


def test_echo_listener_returns_messages_to_the_sender():
    udp = make(echo=True)
    udp.send(b"me", A)
    assert udp.sent == [(b"me\n", A)]


def test_stopping_forgets_every_peer():
    udp = make()
    udp.send(b"", A)
    udp.send(b"", B)
    assert udp.gateway.stop()
    assert udp.bus.peer_count == 0
    assert udp.peers == {}
    assert udp.gateway.reactor.getDelayedCalls() == []
