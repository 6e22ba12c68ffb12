"""The line protocol in memory: framing, welcome, quit, limits, slow consumers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from gateway.bus import Bus
from gateway.config import Limits, StreamListenerConfig
from gateway.flow import Backlog
from gateway.tcp import LineFactory, LineProtocol


def listener(**overrides: object) -> StreamListenerConfig:
    values: dict[str, object] = {
        "name": "tcp",
        "type": "tcp",
        "host": "127.0.0.1",
        "port": 0,
        "channel": "main",
        "echo": False,
        "welcome": "",
        "quit_command": "",
    }
    values.update(overrides)
    return StreamListenerConfig(**values)  # type: ignore[arg-type]


class Gateway:
    """A bus and a factory; ``connect()`` gives a connected protocol and its transport."""

    def __init__(self, limits: Limits | None = None, **overrides: object) -> None:
        self.bus = Bus()
        self.clock = Clock()
        self.factory = LineFactory(
            self.bus, listener(**overrides), limits or Limits(), "gw", self.clock
        )

    def connect(self) -> tuple[LineProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def backlog_of(protocol: LineProtocol) -> Backlog:
    assert protocol.backlog is not None
    return protocol.backlog


def take(transport: StringTransport) -> bytes:
    data: bytes = transport.value()
    transport.clear()
    return data


def test_lines_are_relayed_with_cr_stripped_and_empty_lines_ignored():
    gw = Gateway()
    (a, _), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"one\r\n\r\n\ntwo\nthree\r")
    assert take(tb) == b"one\ntwo\n"
    a.dataReceived(b"\n")
    assert take(tb) == b"three\n"


def test_only_one_trailing_cr_is_removed():
    gw = Gateway()
    (a, _), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"x\r\r\n\rinner\r\n")
    assert take(tb) == b"x\r\n\rinner\n"


def test_one_write_per_batch():
    gw = Gateway()
    (a, _), (_, tb) = gw.connect(), gw.connect()
    writes: list[bytes] = []
    tb.write = writes.append  # type: ignore[method-assign]
    a.dataReceived(b"".join(b"line %d\n" % i for i in range(100)))
    assert len(writes) == 1
    assert writes[0].count(b"\n") == 100


def test_welcome_fields():
    gw = Gateway(welcome="hi {peer}, #{count} on {name}")
    _, ta = gw.connect()
    assert take(ta) == b"hi tcp-1, #1 on gw\n"
    _, tb = gw.connect()
    assert take(tb) == b"hi tcp-2, #2 on gw\n"


def test_welcome_counts_every_transport():
    gw = Gateway(welcome="{count}")
    from tests.test_bus import CountingFramer, FakePeer

    gw.bus.attach(FakePeer(gw.bus, "udp-1", CountingFramer("datagram")))
    _, t = gw.connect()
    assert take(t) == b"2\n"


def test_quit_command_relays_lines_before_it_and_closes():
    gw = Gateway(quit_command="close")
    (a, ta), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"before\nclose\r\nafter\n")
    assert take(tb) == b"before\n"
    assert ta.disconnecting
    a.dataReceived(b"more\n")
    assert take(tb) == b""
    assert gw.bus.peer_count == 1


def test_a_line_merely_containing_the_quit_command_is_relayed():
    gw = Gateway(quit_command="close")
    (a, ta), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"close the door\n")
    assert take(tb) == b"close the door\n"
    assert not ta.disconnecting


def test_oversize_line_closes_after_relaying_what_came_before():
    gw = Gateway(Limits(max_message_bytes=10))
    (a, ta), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"0123456789\r\nshort\n01234567890\nlater\n")
    assert take(tb) == b"0123456789\nshort\n"
    assert ta.disconnecting
    assert b"too long" in ta.value()
    assert gw.bus.metrics.dropped["oversize"] == 1


def test_a_partial_line_over_the_limit_closes_before_its_newline():
    gw = Gateway(Limits(max_message_bytes=10))
    (a, ta), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"0123456789\r")  # exactly the limit plus a CR: still fine
    assert not ta.disconnecting
    a.dataReceived(b"\n0123456789ab")
    assert take(tb) == b"0123456789\n"
    assert ta.disconnecting


def test_slow_consumer_is_disconnected_past_max_pending_bytes():
    gw = Gateway(Limits(max_pending_bytes=1024))
    (a, _), (b, tb) = gw.connect(), gw.connect()
    backlog_of(b).pauseProducing()  # the transport says its buffer is full
    a.dataReceived(b"x" * 500 + b"\n")
    a.dataReceived(b"x" * 500 + b"\n")
    assert not tb.disconnecting
    a.dataReceived(b"x" * 500 + b"\n")
    assert tb.disconnecting  # aborted (StringTransport records both the same way)
    assert gw.bus.metrics.disconnects["slow_consumer"] == 1
    assert gw.bus.peer_count == 1


def test_a_consumer_that_drains_in_time_loses_nothing():
    gw = Gateway(Limits(max_pending_bytes=1024))
    (a, _), (b, tb) = gw.connect(), gw.connect()
    for _ in range(10):
        backlog_of(b).pauseProducing()
        a.dataReceived(b"y" * 900 + b"\n")
        backlog_of(b).resumeProducing()
    assert not tb.disconnecting
    assert take(tb) == (b"y" * 900 + b"\n") * 10


def test_disconnect_detaches():
    gw = Gateway()
    a, _ = gw.connect()
    assert gw.bus.peer_count == 1
    a.connectionLost()
    assert gw.bus.peer_count == 0
    assert not gw.factory.connections


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def test_over_iosim_two_clients_talk():
    gw = Gateway(welcome="w")
    client_a, _server_a, pump_a = iosim.connectedServerAndClient(
        lambda: gw.factory.buildProtocol(None), Collect
    )
    client_b, _server_b, pump_b = iosim.connectedServerAndClient(
        lambda: gw.factory.buildProtocol(None), Collect
    )
    assert client_a.transport is not None
    client_a.transport.write(b"hello\nworld\n")
    pump_a.flush()
    pump_b.flush()
    assert client_b.data == b"w\nhello\nworld\n"
    assert client_a.data == b"w\n"


chunks = st.lists(st.binary(max_size=40), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks, st.data())
def test_any_split_of_the_stream_gives_the_same_messages(pieces, data):
    stream = b"\n".join(p for p in pieces) + b"\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    expected = [line[:-1] if line.endswith(b"\r") else line for line in stream.split(b"\n")[:-1]]
    expected = [line for line in expected if line]

    gw = Gateway(Limits(max_message_bytes=1000))
    (a, _), (_, tb) = gw.connect(), gw.connect()
    start = 0
    for cut in [*cuts, len(stream)]:
        a.dataReceived(stream[start:cut])
        start = cut
    received = tb.value().split(b"\n")[:-1] if tb.value() else []
    assert received == expected
