"""Flow control in memory: slow consumers, backpressure, rate limits, idle peers, caps."""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import Logger, LogLevel, capturedLogs

from gateway.config import Limits
from gateway.core.metrics import Metrics
from gateway.flow.backlog import TRANSPORT_BUFFER, WriteThrough
from gateway.flow.backpressure import Backpressure
from gateway.flow.caps import TokenBucket
from gateway.flow.ratelog import RateLimitedLog
from gateway.testing import MemoryGateway, StreamConnection
from gateway.transports.line import LINE_FRAMER
from tests.test_tcp import take


class Reading:
    """Whether the gateway reads a connection, as its transport was told.

    iosim's transport ignores ``pauseProducing`` (a real one stops reading the
    socket), so this records the calls the way ``StringTransport.producerState`` does.
    """

    def __init__(self, connection: StreamConnection) -> None:
        self.state = "producing"
        transport: Any = connection.server_io
        transport.pauseProducing = self._pause
        transport.resumeProducing = self._resume

    def _pause(self) -> None:
        self.state = "paused"

    def _resume(self) -> None:
        self.state = "producing"


def warnings_of(gw: MemoryGateway, since: int) -> list[Any]:
    return [e for e in list(gw.log_events())[since:] if e["log_level"] == LogLevel.warn]


def test_drop_policy_discards_whole_messages_until_the_receiver_drains(start):
    gw = start(limits='max_pending_bytes = 1024\nslow_consumer = "drop"')
    a, b = gw.connect("tcp"), gw.connect("tcp")
    b.stall()
    for i in range(20):
        a.send(b"%02d" % i + b"x" * 98 + b"\n")  # 101 bytes each
    assert not b.server_io.disconnecting
    assert gw.bus.metrics.dropped["slow_consumer"] == 10
    b.unstall()
    kept = take(b).split(b"\n")[:-1]
    assert kept == [b"%02d" % i + b"x" * 98 for i in range(10)]  # 1010 bytes fit in 1024
    a.send(b"after\n")
    assert take(b) == b"after\n"
    assert not b.closed
    assert len(gw.logged("dropping its messages")) == 1
    assert gw.logged("caught up") == ["tcp-2 caught up; 10 messages were dropped for it"]


def test_disconnect_policy_drops_the_peer_once(start):
    gw = start(limits="max_pending_bytes = 1024")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    b.stall()
    for _ in range(30):
        a.send(b"z" * 200 + b"\n")
    assert b.server_io.disconnecting
    assert gw.bus.metrics.disconnects["slow_consumer"] == 1
    assert gw.service.governor.backpressure.total_pending <= 1024
    assert len(gw.logged("is not reading")) == 1


def test_global_backpressure_pauses_every_sender_and_resumes_at_half(start):
    gw = start(limits=f"max_pending_bytes = {64 * 1024}\nmax_total_pending_bytes = {100 * 1024}")
    backpressure = gw.service.governor.backpressure
    senders = [gw.connect("tcp") for _ in range(3)]
    slow = [gw.connect("tcp") for _ in range(2)]
    reading = {connection: Reading(connection) for connection in senders + slow}
    for connection in slow:
        connection.stall()
    for _ in range(60):
        senders[0].send(b"q" * 1000 + b"\n")
    # 2 slow receivers x ~50 KiB each > 100 KiB: everybody's reading is paused.
    assert backpressure.backpressure
    assert all(r.state == "paused" for r in reading.values())
    slow[0].unstall()
    # Still over half the limit: senders stay paused (no flapping).
    assert backpressure.backpressure
    assert reading[senders[1]].state == "paused"
    slow[1].unstall()
    assert backpressure.total_pending == 0
    assert not backpressure.backpressure
    for connection in senders:
        assert reading[connection].state == "producing"
    for connection in slow:
        assert connection.received() == (b"q" * 1000 + b"\n") * 60  # nothing was lost


def test_rate_limit_pauses_a_flooding_stream_sender_until_it_is_back_under(start):
    gw = start(limits="max_messages_per_second = 10")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    reading = Reading(a)
    a.send(b"m\n" * 10)  # the burst: one second's worth
    assert reading.state == "producing"
    a.send(b"m\n" * 5)  # 5 over: paused for half a second
    assert reading.state == "paused"
    assert take(b) == b"m\n" * 15  # nothing that was read is lost
    gw.advance(0.4)
    assert reading.state == "paused"
    gw.advance(0.2)
    assert reading.state == "producing"
    assert gw.bus.metrics.throttled == 1


def test_idle_timeout_drops_silent_stream_peers_only(start):
    gw = start(limits="idle_timeout = 5")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    for _ in range(4):
        gw.advance(2)
        a.send(b"x")  # even a partial line is traffic
    assert not a.closed
    assert b.closed
    assert gw.bus.metrics.disconnects["idle_timeout"] == 1
    assert gw.logged(r"tcp-2 disconnected \(idle for 5 s\)")


def test_connection_caps_total_and_per_ip_with_rate_limited_logging(start):
    gw = start(limits="max_connections = 3\nmax_connections_per_ip = 2")
    ok = [gw.connect("tcp", "127.0.0.1"), gw.connect("tcp", "127.0.0.1")]
    since = len(list(gw.log_events()))
    refused = [gw.connect("tcp", "127.0.0.1") for _ in range(5)]
    third = gw.connect("tcp", "127.0.0.2")
    over_total = gw.connect("tcp", "127.0.0.3")
    gw.advance(1.5)
    third.close()
    again = gw.connect("tcp", "127.0.0.1")
    assert all(not c.closed for c in ok)
    assert all(c.closed for c in refused)
    assert over_total.closed
    assert again.closed
    assert gw.bus.metrics.disconnects["max_connections_per_ip"] == 6
    assert gw.bus.metrics.disconnects["max_connections"] == 1
    assert gw.bus.peer_count == 2
    warnings = warnings_of(gw, since)
    # One line per cause per second, the next one saying how many were suppressed.
    assert len(warnings) == 3
    assert [w["cause"] for w in warnings] == [
        "max_connections_per_ip",
        "max_connections",
        "max_connections_per_ip",
    ]
    assert warnings[2]["suppressed"] == 4
    ok[0].close()
    assert gw.service.governor.gate.per_ip == {"127.0.0.1": 1}
    assert not gw.connect("tcp", "127.0.0.1").closed


def test_token_bucket():
    clock = Clock()
    bucket = TokenBucket(4, clock)
    assert bucket.has(4)
    assert not bucket.has(1)
    clock.advance(0.25)
    assert bucket.has(1)
    assert bucket.take(3) == 3.0
    clock.advance(10)
    assert bucket.take(1) == 0.0


def test_rate_limited_log_counts_suppressed_lines():
    clock = Clock()
    log = RateLimitedLog(Logger(), clock)
    with capturedLogs() as events:
        for _ in range(10):
            log.emit("cause", "something happened")
        clock.advance(1)
        log.emit("cause", "something happened")
        log.emit("other", "something else")
    assert [e.get("suppressed") for e in events] == [0, 9, 0]


class FakeSocket:
    """Takes at most ``room`` bytes per send; raises EAGAIN when it takes none."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent = b""

    def send(self, data: bytes) -> int:
        if self.room == 0:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        taken = data[: self.room]
        self.sent += taken
        return len(taken)


class HandleTransport(StringTransport):
    def __init__(self, sock: FakeSocket) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> FakeSocket:
        return self.sock


class Owner:
    """A backlog's owner that notes what it hears."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.events = [] if events is None else events

    def slow(self) -> None:
        self.events.append("overflow")

    def log_drop(self, started: bool, count: int) -> None:
        self.events.append(f"drop {started} {count}")

    def count(self, wire: bytes) -> int:
        return LINE_FRAMER.count(wire)


def write_through(limits: Limits) -> tuple[WriteThrough, FakeSocket, HandleTransport, list[str]]:
    sock = FakeSocket(room=1_000_000)
    transport = HandleTransport(sock)
    events: list[str] = []
    out = WriteThrough(Backpressure(limits, Metrics()), limits, Owner(events), transport)
    transport.registerProducer(out, False)
    return out, sock, transport, events


def test_write_through_sends_at_once_while_nothing_is_queued():
    out, sock, transport, _ = write_through(Limits())
    out.write(b"a\n")
    out.write(b"b\n")
    assert sock.sent == b"a\nb\n"
    assert transport.value() == b""  # Twisted's buffer never saw it


def test_write_through_queues_the_rest_and_keeps_the_order():
    out, sock, transport, _ = write_through(Limits())
    sock.room = 3
    out.write(b"hello\n")  # the socket takes "hel"
    sock.room = 1_000_000
    out.write(b"world\n")  # must not overtake "lo\n"
    assert sock.sent == b"hel"
    assert transport.value() == b"lo\nworld\n"
    assert not out.idle
    transport.clear()
    out.resumeProducing()  # Twisted: the buffer has drained
    out.write(b"again\n")
    assert sock.sent == b"helagain\n"


def test_write_through_socket_full_goes_to_the_transport():
    out, sock, transport, _ = write_through(Limits())
    sock.room = 0
    out.write(b"x\n")
    assert transport.value() == b"x\n" and sock.sent == b""


def test_write_through_applies_the_slow_consumer_limit():
    limits = Limits(max_pending_bytes=4096)
    out, sock, _transport, events = write_through(limits)
    sock.room = 0
    chunk = b"y" * 1023 + b"\n"
    for _ in range(64):  # 64 KiB: the transport's own buffer
        out.write(chunk)
    assert not out.paused and not events
    out.write(chunk)
    assert out.paused
    for _ in range(4):  # 4 KiB more may wait
        out.write(chunk)
    assert not events
    out.write(chunk)
    assert events == ["overflow"]


def test_write_through_drop_mode_resumes_after_draining():
    limits = Limits(max_pending_bytes=2048, slow_consumer="drop")
    out, sock, transport, events = write_through(limits)
    sock.room = 0
    for _ in range(70):
        out.write(b"z" * 1023 + b"\n")
    assert events and events[0].startswith("drop True")
    transport.clear()
    out.resumeProducing()
    assert events[-1].startswith("drop False")
    sock.room = 100
    out.write(b"fresh\n")
    assert sock.sent == b"fresh\n"


class SocketDescriptor(FileDescriptor):
    """A Twisted transport over a ``FakeSocket``: its ``write`` buffers, ``doWrite`` sends
    what the socket takes, and registering a pull producer asks it for data at once (as
    every Twisted socket transport does)."""

    connected = 1

    def __init__(self, sock: FakeSocket) -> None:
        super().__init__(MemoryReactor())
        self.sock = sock

    def getHandle(self) -> FakeSocket:
        return self.sock

    def writeSomeData(self, data: bytes) -> int:
        try:
            return self.sock.send(bytes(data))
        except BlockingIOError:
            return 0


def test_a_hold_makes_what_follows_wait_behind_the_other_writers_bytes():
    """Another writer (Autobahn: a pong, a close frame) wrote to the transport: what the
    backlog writes next must not overtake those bytes, nor land inside them."""
    sock = FakeSocket(room=1_000_000)
    transport = SocketDescriptor(sock)
    out = WriteThrough(Backpressure(Limits(), Metrics()), Limits(), Owner(), transport)
    transport.registerProducer(out, False)
    out.write(b"a\n")
    assert sock.sent == b"a\n"  # written through
    out.hold(4)
    transport.write(b"PONG")
    out.write(b"b\n")
    assert sock.sent == b"a\n"  # waits behind PONG, in Twisted's buffer
    sock.room = 3
    transport.doWrite()  # the socket takes "PON"
    out.write(b"c\n")
    sock.room = 1_000_000
    transport.doWrite()  # drained: Twisted tells the backlog
    assert sock.sent == b"a\nPONGb\nc\n" and out.idle
    out.write(b"d\n")
    assert sock.sent.endswith(b"c\nd\n")


def test_a_hold_before_registering_outlasts_the_call_registering_makes():
    """Autobahn's handshake response is written before the backlog becomes the transport's
    producer; registering it calls ``resumeProducing`` while that response still waits."""
    sock = FakeSocket(room=1_000_000)
    transport = SocketDescriptor(sock)
    out = WriteThrough(Backpressure(Limits(), Metrics()), Limits(), Owner(), transport)
    out.hold(12)
    transport.write(b"HTTP/1.1 101")
    transport.registerProducer(out, False)
    out.write(b"welcome\n")
    assert sock.sent == b""
    transport.doWrite()
    assert sock.sent == b"HTTP/1.1 101welcome\n" and out.idle
    out.write(b"next\n")
    assert sock.sent.endswith(b"welcome\nnext\n")


def test_a_lasting_hold_stops_writing_through():
    sock = FakeSocket(room=1_000_000)
    transport = SocketDescriptor(sock)
    out = WriteThrough(Backpressure(Limits(), Metrics()), Limits(), Owner(), transport)
    transport.registerProducer(out, False)
    out.hold(1, lasting=True)
    transport.write(b"x")
    transport.doWrite()
    out.write(b"y\n")
    assert sock.sent == b"x" and not out.idle  # through Twisted's buffer from now on
    transport.doWrite()
    assert sock.sent == b"xy\n"


def test_holds_count_towards_the_transport_buffer():
    limits = Limits(max_pending_bytes=1024)
    out, _sock, _transport, events = write_through(limits)
    out.hold(TRANSPORT_BUFFER + 1)
    assert out.paused  # what follows is within max_pending_bytes, then the policy applies
    out.write(b"z" * 1023 + b"\n")
    assert not events and out.pending == 1024
    out.write(b"z\n")
    assert events == ["overflow"]
