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
