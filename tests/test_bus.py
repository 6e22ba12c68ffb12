"""The bus in memory: fan-out rules, framing once per batch, isolation of failures."""

from __future__ import annotations

from typing import Any

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.core.bus import Bus
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin


@implementer(IFramer)
class CountingFramer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def frame(self, batch: Batch) -> Any:
        self.calls += 1
        return (self.name, list(batch.payloads))

    def count(self, wire: Any) -> int:
        return len(wire[1])


@implementer(IPeer)
class FakePeer:
    subject: str | None = None
    pending_bytes = 0
    dropped_messages = 0
    permissions = None

    def forbidden(self, action: str, channel: str) -> None:
        raise AssertionError(f"refused {action} {channel}")

    def __init__(
        self, bus: Bus, name: str, framer: IFramer, channel: str = "main", echo: bool = False
    ) -> None:
        self.origin = Origin(name, "test", "fake")
        self.channel = channel
        self.framer = framer
        self.echo = echo
        self.address = "nowhere"
        self.received: list[Any] = []
        self.closed: str | None = None
        self.bus = bus

    def deliver(self, wire: Any) -> None:
        self.received.append(wire)

    def close(self, reason: str) -> None:
        self.closed = reason
        self.bus.detach(self)

    def send(self, *payloads: bytes) -> int:
        return self.bus.publish(self, Batch(self.origin, self.channel, list(payloads)))


@pytest.fixture
def bus() -> Bus:
    return Bus()


def test_peers_provide_the_interfaces(bus):
    verifyObject(IPeer, FakePeer(bus, "a", CountingFramer("x")))
    verifyObject(IFramer, CountingFramer("x"))


def test_every_other_peer_on_the_channel_gets_the_batch_not_the_sender(bus):
    framer = CountingFramer("x")
    a, b, c = (FakePeer(bus, n, framer) for n in "abc")
    for p in (a, b, c):
        bus.attach(p)
    assert a.send(b"1", b"2") == 2
    assert a.received == []
    assert b.received == c.received == [("x", [b"1", b"2"])]


def test_echo_peer_gets_its_own_messages(bus):
    framer = CountingFramer("x")
    a = FakePeer(bus, "a", framer, echo=True)
    bus.attach(a)
    a.send(b"me")
    assert a.received == [("x", [b"me"])]


def test_each_framer_runs_once_per_batch_whatever_the_receiver_count(bus):
    lines, datagrams = CountingFramer("line"), CountingFramer("datagram")
    sender = FakePeer(bus, "s", lines)
    bus.attach(sender)
    receivers = [FakePeer(bus, f"l{i}", lines) for i in range(50)] + [
        FakePeer(bus, f"d{i}", datagrams) for i in range(50)
    ]
    for r in receivers:
        bus.attach(r)
    assert sender.send(b"m") == 100
    assert (lines.calls, datagrams.calls) == (1, 1)
    assert all(len(r.received) == 1 for r in receivers)


def test_no_framing_when_the_sender_is_alone(bus):
    framer = CountingFramer("x")
    a = FakePeer(bus, "a", framer)
    bus.attach(a)
    assert a.send(b"m") == 0
    assert framer.calls == 0


def test_channels_are_separate(bus):
    framer = CountingFramer("x")
    red, red2, blue = (
        FakePeer(bus, "r", framer, "red"),
        FakePeer(bus, "r2", framer, "red"),
        FakePeer(bus, "b", framer, "blue"),
    )
    for p in (red, red2, blue):
        bus.attach(p)
    red.send(b"hi")
    assert red2.received and not blue.received
    assert {p.origin.peer_id for p in bus.peers("red")} == {"r", "r2"}


def test_order_per_sender_is_kept(bus):
    framer = CountingFramer("x")
    a, b = FakePeer(bus, "a", framer), FakePeer(bus, "b", framer)
    bus.attach(a), bus.attach(b)
    for i in range(1000):
        a.send(b"%d" % i)
    assert [w[1][0] for w in b.received] == [b"%d" % i for i in range(1000)]


def test_attach_detach_and_count(bus):
    framer = CountingFramer("x")
    a, b = FakePeer(bus, "a", framer), FakePeer(bus, "b", framer)
    assert bus.attach(a) == 1
    assert bus.attach(a) == 1  # twice is once
    assert bus.attach(b) == 2
    bus.detach(a)
    bus.detach(a)
    assert bus.peer_count == 1
    bus.detach(b)
    assert bus.peer_count == 0
    assert bus.peers() == []


def test_a_failing_receiver_is_closed_and_never_hurts_the_sender_or_others(bus):
    framer = CountingFramer("x")
    sender, good1, good2 = (
        FakePeer(bus, "s", framer),
        FakePeer(bus, "g1", framer),
        FakePeer(bus, "g2", framer),
    )
    bad = FakePeer(bus, "bad", framer)

    def explode(wire: Any) -> None:
        raise ConnectionError("gone")

    bad.deliver = explode  # type: ignore[method-assign]
    for p in (sender, good1, bad, good2):
        bus.attach(p)
    assert sender.send(b"m") == 2
    assert good1.received and good2.received
    assert bad.closed == "delivery failed"
    assert bus.peer_count == 3
    assert bus.metrics.disconnects["delivery_error"] == 1


def test_a_receiver_leaving_during_delivery_does_not_disturb_the_loop(bus):
    framer = CountingFramer("x")
    sender = FakePeer(bus, "s", framer)
    peers = [FakePeer(bus, f"p{i}", framer) for i in range(5)]
    victim = peers[3]

    def leave_and_deliver(wire: Any) -> None:
        bus.detach(victim)  # as a peer closing another during fan-out would
        peers[1].received.append(wire)

    peers[1].deliver = leave_and_deliver  # type: ignore[method-assign]
    for p in (sender, *peers):
        bus.attach(p)
    sender.send(b"m")
    assert all(p.received for p in peers)
    sender.send(b"n")
    assert len(victim.received) == 1


def test_presence_watchers_see_joins_and_leaves_on_their_channel(bus):
    events: list[tuple[str, str, int]] = []
    bus.watch_presence(
        "main", lambda event, peer, count: events.append((event, peer.origin.peer_id, count))
    )
    framer = CountingFramer("x")
    a, other = FakePeer(bus, "a", framer), FakePeer(bus, "o", framer, "other")
    bus.attach(a)
    bus.attach(other)
    bus.detach(a)
    assert events == [("join", "a", 1), ("leave", "a", 1)]


def test_metrics_count_per_batch(bus):
    framer = CountingFramer("x")
    a, b, c = (FakePeer(bus, n, framer) for n in "abc")
    for p in (a, b, c):
        bus.attach(p)
    a.send(b"12", b"345")
    assert bus.metrics.messages_received["test", "fake"] == 2
    assert bus.metrics.bytes_received["test", "fake"] == 5
    assert bus.metrics.messages_delivered == 4


def test_new_peer_ids_are_unique_per_prefix(bus):
    assert [bus.new_peer_id("tcp"), bus.new_peer_id("tcp"), bus.new_peer_id("udp")] == [
        "tcp-1",
        "tcp-2",
        "udp-1",
    ]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"plain", Kind.TEXT),
        ("h\u00e9llo \u2603".encode(), Kind.TEXT),
        (b"\xff\xfe", Kind.BINARY),
        (b"", Kind.TEXT),
    ],
)
def test_kind_of_untyped_bytes(payload, kind):
    assert Kind.of(payload) is kind


def test_batch_messages_pair_payloads_with_kinds():
    origin = Origin("p", "l", "tcp")
    assert list(Batch(origin, "c", [b"a", b"\xff"]).messages()) == [
        (b"a", Kind.TEXT),
        (b"\xff", Kind.BINARY),
    ]
    assert list(Batch(origin, "c", [b"a"], [Kind.BINARY]).messages()) == [(b"a", Kind.BINARY)]
