"""Flow control in memory: slow consumers, backpressure, rate limits, idle peers, caps."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, capturedLogs

from gateway.bus import Bus
from gateway.config import Limits
from gateway.flow import FlowContext, RateLimitedLog, TokenBucket
from gateway.tcp import LineFactory, LineProtocol
from tests.test_tcp import backlog_of, listener, take


class Gateway:
    def __init__(self, limits: Limits, **overrides: Any) -> None:
        self.bus = Bus()
        self.clock = Clock()
        self.flow = FlowContext(limits, self.bus.metrics, self.clock)
        self.factory = LineFactory(
            self.bus, listener(**overrides), limits, "gw", self.clock, flow=self.flow
        )

    def connect(self, host: str = "127.0.0.1") -> tuple[LineProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=_Address(host))
        protocol.makeConnection(transport)
        return protocol, transport


class _Address:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 40000

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def test_drop_policy_discards_whole_messages_until_the_receiver_drains():
    gw = Gateway(Limits(max_pending_bytes=1024, slow_consumer="drop"))
    (a, _), (b, tb) = gw.connect(), gw.connect()
    backlog = backlog_of(b)
    with capturedLogs() as events:
        backlog.pauseProducing()
        for i in range(20):
            a.dataReceived(b"%02d" % i + b"x" * 98 + b"\n")  # 101 bytes each
        assert not tb.disconnecting
        kept = take(tb).split(b"\n")[:-1]
        assert len(kept) == 10  # 1010 bytes fit in 1024
        assert all(len(line) == 100 for line in kept)
        assert gw.bus.metrics.dropped["slow_consumer"] == 10
        backlog.resumeProducing()
        a.dataReceived(b"after\n")
    assert take(tb) == b"after\n"
    texts = [e["log_format"] for e in events if e["log_level"] >= LogLevel.info]
    assert sum("dropping its messages" in t for t in texts) == 1
    assert sum("caught up" in t for t in texts) == 1


def test_disconnect_policy_drops_the_peer_once():
    gw = Gateway(Limits(max_pending_bytes=1024))
    (a, _), (b, tb) = gw.connect(), gw.connect()
    backlog_of(b).pauseProducing()
    for _ in range(30):
        a.dataReceived(b"z" * 200 + b"\n")
    assert tb.disconnecting
    assert gw.bus.metrics.disconnects["slow_consumer"] == 1
    assert gw.flow.flow.total_pending <= 1024


def test_global_backpressure_pauses_every_sender_and_resumes_at_half():
    limits = Limits(max_pending_bytes=64 * 1024, max_total_pending_bytes=100 * 1024)
    gw = Gateway(limits)
    senders = [gw.connect() for _ in range(3)]
    slow = [gw.connect() for _ in range(2)]
    for protocol, _ in slow:
        backlog_of(protocol).pauseProducing()
    sender, _ = senders[0]
    for _ in range(60):
        sender.dataReceived(b"q" * 1000 + b"\n")
    # 2 slow receivers x ~50 KiB each > 100 KiB: everybody's reading is paused.
    assert gw.flow.flow.backpressure
    for _, transport in senders + slow:
        assert transport.producerState == "paused"
    backlog_of(slow[0][0]).resumeProducing()
    # Still over half the limit: senders stay paused (no flapping).
    assert gw.flow.flow.backpressure
    assert senders[1][1].producerState == "paused"
    backlog_of(slow[1][0]).resumeProducing()
    assert gw.flow.flow.total_pending == 0
    assert not gw.flow.flow.backpressure
    for _, transport in senders:
        assert transport.producerState == "producing"


def test_rate_limit_pauses_a_flooding_stream_sender_until_it_is_back_under():
    gw = Gateway(Limits(max_messages_per_second=10))
    (a, ta), (_, tb) = gw.connect(), gw.connect()
    a.dataReceived(b"m\n" * 10)  # the burst: one second's worth
    assert ta.producerState == "producing"
    a.dataReceived(b"m\n" * 5)  # 5 over: paused for half a second
    assert ta.producerState == "paused"
    assert take(tb) == b"m\n" * 15  # nothing that was read is lost
    gw.clock.advance(0.4)
    assert ta.producerState == "paused"
    gw.clock.advance(0.2)
    assert ta.producerState == "producing"
    assert gw.bus.metrics.throttled == 1


def test_idle_timeout_drops_silent_stream_peers_only():
    gw = Gateway(Limits(idle_timeout=5))
    (a, ta), (_, tb) = gw.connect(), gw.connect()
    for _ in range(4):
        gw.clock.advance(2)
        a.dataReceived(b"x")  # even a partial line is traffic
    assert not ta.disconnecting
    assert tb.disconnecting
    assert gw.bus.metrics.disconnects["idle_timeout"] == 1


def test_connection_caps_total_and_per_ip_with_rate_limited_logging():
    gw = Gateway(Limits(max_connections=3, max_connections_per_ip=2))
    ok = [gw.connect("127.0.0.1"), gw.connect("127.0.0.1")]
    with capturedLogs() as events:
        refused = [gw.connect("127.0.0.1") for _ in range(5)]
        third = gw.connect("127.0.0.2")
        over_total = gw.connect("127.0.0.3")
        gw.clock.advance(1.5)
        third[0].connectionLost()
        again = gw.connect("127.0.0.1")
    assert all(not t.disconnecting for _, t in ok)
    assert all(t.disconnecting for _, t in refused)
    assert over_total[1].disconnecting
    assert again[1].disconnecting
    assert gw.bus.metrics.disconnects["max_connections_per_ip"] == 6
    assert gw.bus.metrics.disconnects["max_connections"] == 1
    assert gw.bus.peer_count == 2
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    # One line per cause per second, the next one saying how many were suppressed.
    assert len(warnings) == 3
    assert warnings[2]["suppressed"] == 4
    for protocol, _ in refused:
        protocol.connectionLost()
    ok[0][0].connectionLost()
    assert gw.flow.gate.per_ip["127.0.0.1"] == 1
    _, transport = gw.connect("127.0.0.1")
    assert not transport.disconnecting


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


def write_through(limits: Limits) -> tuple[Any, FakeSocket, HandleTransport, list[str]]:
    from gateway.flow import FlowControl, WriteThrough, count_lines
    from gateway.metrics import Metrics

    sock = FakeSocket(room=1_000_000)
    transport = HandleTransport(sock)
    events: list[str] = []

    class Owner:
        def slow(self) -> None:
            events.append("overflow")

        def log_drop(self, started: bool, count: int) -> None:
            events.append(f"drop {started} {count}")

    out = WriteThrough(FlowControl(limits, Metrics()), limits, Owner(), count_lines, transport)
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
