"""The Redis backplane in memory: the wire format, and nodes on a fake Redis.

``FakeRedis`` speaks just enough RESP (PING, AUTH, PUBLISH, PSUBSCRIBE) over
``iosim`` connections for the real txredisapi protocols; time is a ``Clock``,
so timeouts and backoff run without waiting.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any

import hiredis
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from gateway.auth.roles import Permissions, Role
from gateway.cluster.backplane import Backplane
from gateway.cluster.redis import parse_redis_url
from gateway.cluster.wire import Frame, WireError, decode, encode_batch, encode_presence
from gateway.config import ClusterSettings
from gateway.core.bus import Bus, RemotePeer
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin

# The wire format

payloads = st.lists(st.binary(max_size=64), min_size=1, max_size=20)


@given(payloads=payloads, data=st.data())
def test_typed_batches_round_trip(payloads, data):
    kinds = data.draw(
        st.lists(st.sampled_from(Kind), min_size=len(payloads), max_size=len(payloads))
    )
    origin = Origin("ws-7", "web", "ws")
    frame = decode(encode_batch("gw-a", Batch(origin, "main", payloads, kinds)))
    assert frame == Frame(0, "gw-a", "main", "ws-7", "web", "ws", tuple(kinds), tuple(payloads))


@given(payloads=payloads)
def test_untyped_batches_round_trip(payloads):
    frame = decode(encode_batch("n", Batch(Origin("udp-1", "u", "udp"), "c", payloads)))
    assert frame.kinds is None
    assert list(frame.payloads) == payloads
    assert frame.lines is None


@given(
    lines=st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b), min_size=1)
)
def test_line_batches_travel_as_the_bytes_read(lines):
    chunk = b"\n".join(lines) + b"\n"
    batch = Batch(Origin("tcp-1", "t", "tcp"), "c", lines, None, chunk)
    frame = decode(encode_batch("n", batch))
    assert frame.lines == chunk
    assert list(frame.payloads) == lines


def test_presence_round_trips():
    frame = decode(encode_presence("gw-b", "leave", Origin("tcp-2", "t", "tcp"), "main"))
    assert frame == Frame(2, "gw-b", "main", "tcp-2", "t", "tcp")


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_wire_error(data):
    with contextlib.suppress(WireError):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        bytes([0x93, 1, 0, 0xA1]),  # truncated
        encode_batch("n", Batch(Origin("p", "l", "t"), "c", [b"x"]))[:-1],
        # version 2
        b"\x99\x02" + encode_batch("n", Batch(Origin("p", "l", "t"), "c", [b"x"]))[2:],
    ],
)
def test_bad_frames_are_rejected(data):
    with pytest.raises(WireError):
        decode(data)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", ("127.0.0.1", 6379, False, None, None)),
        ("redis://localhost", ("localhost", 6379, False, None, None)),
        ("rediss://cache.example:6380", ("cache.example", 6380, True, None, None)),
        ("redis://:s%40cret@h:1/2", ("h", 1, False, None, "s@cret")),
        ("redis://alice:pw@h", ("h", 6379, False, "alice", "pw")),
        ("redis://onlypassword@h", ("h", 6379, False, None, "onlypassword")),
        ("redis://[::1]:7000", ("::1", 7000, False, None, None)),
    ],
)
def test_redis_urls(url, expected):
    address = parse_redis_url(url)
    assert (address.host, address.port, address.tls, address.username, address.password) == expected
    assert "pw" not in address.describe() and "cret" not in address.describe()


# A fake Redis


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _array(*values: bytes) -> bytes:
    return b"*%d\r\n" % len(values) + b"".join(values)


class FakeRedis:
    """Connections, subscriptions and what was published; can refuse, stall and kill."""

    def __init__(self, clock: Clock, password: bytes | None = None) -> None:
        self.clock = clock
        self.password = password
        self.connections: list[RedisConnection] = []
        self.pumps: list[IOPump] = []
        self.refusing = False
        self.stalled = False
        # Seconds a subscribed connection's PONG takes: behind publications that a node too
        # busy to read them all in time has not read yet.
        self.pong_delay = 0.0
        self.published: list[tuple[bytes, bytes]] = []

    def endpoint(self) -> FakeEndpoint:
        return FakeEndpoint(self)

    def settle(self) -> None:
        """Move every byte and disconnect until nothing changes."""
        for _ in range(1000):
            self.clock.advance(0)
            if not any([pump.pump() for pump in list(self.pumps)]):
                return
        raise AssertionError("the fake network does not settle")

    def kill(self, subscribers_only: bool = False) -> None:
        for connection in list(self.connections):
            if connection.subscribed or not subscribers_only:
                assert connection.transport is not None
                connection.transport.loseConnection()
        self.settle()

    def resume(self) -> None:
        self.stalled = False
        for connection in list(self.connections):
            connection.dataReceived(b"")
        self.settle()


class RedisConnection(Protocol):
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.reader = hiredis.Reader()
        self.patterns: list[bytes] = []
        self.channels: list[bytes] = []
        self.authenticated = redis.password is None

    @property
    def subscribed(self) -> bool:
        return bool(self.patterns or self.channels)

    def connectionMade(self) -> None:
        self.redis.connections.append(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.redis.connections:
            self.redis.connections.remove(self)

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        if self.redis.stalled:
            return  # like a stopped process: the bytes wait in the socket buffer
        while (command := self.reader.gets()) is not False:
            self.transport.write(self.execute(command))  # type: ignore[union-attr]

    def execute(self, command: list[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"AUTH":
            self.authenticated = command[-1] == self.redis.password
            return b"+OK\r\n" if self.authenticated else b"-WRONGPASS invalid password\r\n"
        if not self.authenticated:
            return b"-NOAUTH Authentication required.\r\n"
        if name == b"PING":
            pong = _array(_bulk(b"pong"), _bulk(b"")) if self.subscribed else b"+PONG\r\n"
            if self.redis.pong_delay and self.subscribed:
                self.redis.clock.callLater(self.redis.pong_delay, self.transport.write, pong)  # type: ignore[union-attr]
                return b""
            return pong
        if name in (b"SUBSCRIBE", b"PSUBSCRIBE", b"UNSUBSCRIBE", b"PUNSUBSCRIBE"):
            names = self.patterns if name.startswith(b"P") else self.channels
            if name.endswith(b"UNSUBSCRIBE"):
                if command[1] in names:
                    names.remove(command[1])
            elif command[1] not in names:
                names.append(command[1])
            count = len(self.patterns) + len(self.channels)
            return _array(_bulk(name.lower()), _bulk(command[1]), b":%d\r\n" % count)
        if name == b"PUBLISH":
            channel, message = command[1], command[2]
            self.redis.published.append((channel, message))
            reached = 0
            for other in self.redis.connections:
                if channel in other.channels:
                    push = _array(_bulk(b"message"), _bulk(channel), _bulk(message))
                    other.transport.write(push)  # type: ignore[union-attr]
                    reached += 1
                for pattern in other.patterns:
                    if fnmatch.fnmatchcase(channel.decode(), pattern.decode()):
                        push = _array(
                            _bulk(b"pmessage"), _bulk(pattern), _bulk(channel), _bulk(message)
                        )
                        other.transport.write(push)  # type: ignore[union-attr]
                        reached += 1
            return b":%d\r\n" % reached
        return b"-ERR unknown command\r\n"


class FakeEndpoint:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        if self.redis.refusing:
            return fail(ConnectionRefusedError("refused"))
        client = factory.buildProtocol(None)
        server = RedisConnection(self.redis)
        pump = connect(
            server,
            FakeTransport(server, True),
            client,
            FakeTransport(client, False),
            greet=False,
            clock=self.redis.clock,
        )
        self.redis.pumps.append(pump)
        return succeed(client)


# Nodes on the fake Redis


@implementer(IFramer)
class RecordingFramer:
    name = "recording"

    def frame(self, batch: Batch) -> Any:
        return batch

    def count(self, wire: Batch) -> int:
        return len(wire.payloads)


@implementer(IPeer)
class Peer:
    framer = RecordingFramer()
    subject: str | None = None
    pending_bytes = 0
    dropped_messages = 0
    permissions: Permissions | None = None

    def forbidden(self, action: str, channel: str) -> None:
        raise AssertionError(f"refused {action} {channel}")

    def __init__(self, bus: Bus, name: str, channel: str = "main") -> None:
        self.bus = bus
        self.origin = Origin(name, "test", "tcp")
        self.channel = channel
        self.echo = False
        self.address = "nowhere"
        self.batches: list[Batch] = []
        bus.attach(self)

    def deliver(self, wire: Any) -> None:
        self.batches.append(wire)

    def close(self, reason: str) -> None:
        self.bus.detach(self)

    def send(self, *payloads: bytes) -> None:
        self.bus.publish(self, Batch(self.origin, self.channel, list(payloads)))

    def payloads(self) -> list[bytes]:
        return [p for batch in self.batches for p in batch.payloads]


class Node:
    def __init__(self, redis: FakeRedis, name: str, **options: Any) -> None:
        self.bus = Bus()
        url = "redis://:pw@127.0.0.1:6379" if redis.password else "redis://127.0.0.1:6379"
        self.backplane = Backplane(
            ClusterSettings(url, name, "gw"),
            self.bus,
            redis.clock,
            endpoint=redis.endpoint(),  # type: ignore[arg-type]
            **options,
        )
        self.bus.backplane = self.backplane
        self.backplane.startService()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def redis(clock) -> FakeRedis:
    return FakeRedis(clock)


def up(redis: FakeRedis, *nodes: Node) -> None:
    redis.settle()
    assert all(node.backplane.is_up for node in nodes)


def test_a_batch_reaches_every_other_node_once_in_order_never_the_sender(redis):
    a, b, c = Node(redis, "a"), Node(redis, "b"), Node(redis, "c")
    up(redis, a, b, c)
    sender, beside = Peer(a.bus, "tcp-1"), Peer(a.bus, "tcp-2")
    on_b, on_c = Peer(b.bus, "tcp-1"), Peer(c.bus, "tcp-1")
    redis.settle()  # their nodes now listen for "main" on Redis
    for i in range(100):
        sender.send(b"m%d" % i, b"n%d" % i)
    redis.settle()
    expected = [p for i in range(100) for p in (b"m%d" % i, b"n%d" % i)]
    assert beside.payloads() == on_b.payloads() == on_c.payloads() == expected
    assert sender.batches == []
    assert len(redis.published) == 100 + 4  # one PUBLISH per batch (+ the joins)
    remote = on_b.batches[0]
    assert remote.origin.peer_id == "tcp-1@a"
    assert (remote.origin.listener, remote.origin.transport) == ("test", "tcp")
    assert a.backplane.forwarded_batches == 100 and b.backplane.inbox.batches == 100


def test_channels_stay_apart_and_other_prefixes_are_ignored(redis, clock):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    other_cluster = Backplane(
        ClusterSettings("redis://h", "x", "gw:sub"),
        Bus(),
        clock,
        endpoint=redis.endpoint(),
    )
    other_cluster.bus.backplane = other_cluster
    other_cluster.startService()
    redis.settle()
    on_main, on_news = Peer(b.bus, "p1"), Peer(b.bus, "p2", channel="news")
    Peer(b.bus, "p3", channel="sub.>")  # listens with the Redis glob "gw:sub.*"
    redis.settle()
    # "gw:sub" + "main" is the Redis channel "gw:sub:main"; no node of ours wants it.
    Peer(other_cluster.bus, "q").send(b"elsewhere")
    Peer(a.bus, "s", channel="news").send(b"news")
    redis.settle()
    assert on_main.payloads() == []
    assert on_news.payloads() == [b"news"]


def test_presence_crosses_nodes(redis):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    seen: list[tuple[str, str]] = []
    b.bus.watch_presence(
        "main", lambda event, peer, count: seen.append((event, peer.origin.peer_id))
    )
    Peer(b.bus, "watcher")  # a peer on "main" at b: b listens for "main"
    redis.settle()
    seen.clear()
    peer = Peer(a.bus, "tcp-5")
    peer.close("bye")
    redis.settle()
    assert seen == [("join", "tcp-5@a"), ("leave", "tcp-5@a")]


def test_stopping_tells_the_others_our_peers_left(redis):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    Peer(a.bus, "tcp-1")
    Peer(b.bus, "watcher")  # b listens for "main"
    redis.settle()
    events: list[Any] = []
    b.bus.watch_presence("main", lambda event, peer, count: events.append((event, peer)))
    stopped = a.backplane.stopService()
    redis.settle()
    assert stopped.called
    assert [(e, p.origin.peer_id) for e, p in events] == [("leave", "tcp-1@a")]
    assert isinstance(events[0][1], RemotePeer)


def test_unreachable_at_start_serves_locally_and_joins_later_with_backoff(redis, clock):
    redis.refusing = True
    a = Node(redis, "a")
    endpoint = a.backplane._endpoint
    sender, local = Peer(a.bus, "s"), Peer(a.bus, "l")
    sender.send(b"local")
    assert local.payloads() == [b"local"]
    assert a.bus.metrics.dropped["backplane_down"] == 1
    assert not a.backplane.is_up
    waits = []
    for _ in range(8):
        before = endpoint.attempts  # type: ignore[attr-defined]
        waited = 0.0
        while endpoint.attempts == before:  # type: ignore[attr-defined]
            clock.advance(0.25)
            waited += 0.25
        waits.append(waited)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    redis.refusing = False
    clock.advance(10)
    redis.settle()
    assert a.backplane.is_up


def test_redis_lost_mid_run_drops_and_counts_then_resumes(redis, clock):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    sender, local, remote = Peer(a.bus, "s"), Peer(a.bus, "l"), Peer(b.bus, "r")
    redis.settle()
    sender.send(b"before")
    redis.settle()
    redis.refusing = True
    redis.kill()
    assert not a.backplane.is_up and not b.backplane.is_up
    sender.send(b"during", b"outage")
    assert local.payloads() == [b"before", b"during", b"outage"]
    assert a.backplane.dropped_down == 2 and a.backplane.unforwarded == 1
    redis.refusing = False
    clock.advance(1)
    redis.settle()
    assert a.backplane.is_up and b.backplane.is_up
    sender.send(b"after")
    redis.settle()
    assert remote.payloads() == [b"before", b"after"]
    assert a.backplane.outages == 1 and a.backplane.connects == 2


def test_killed_subscription_resubscribes(redis):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    remote = Peer(b.bus, "r")
    redis.clock.advance(5)  # a link that lasted: reconnected at once
    redis.kill(subscribers_only=True)
    up(redis, a, b)
    Peer(a.bus, "s").send(b"again")
    redis.settle()
    assert remote.payloads() == [b"again"]


def test_a_stalled_redis_is_detected_by_ping_and_never_blocks(redis, clock):
    a, b = (
        Node(redis, "a", health_interval=1.0, timeout=2.0, max_pending_bytes=4096),
        Node(redis, "b"),
    )
    up(redis, a, b)
    sender, local = Peer(a.bus, "s"), Peer(a.bus, "l")
    redis.stalled = True
    for i in range(100):
        sender.send(b"x" * 100 + b"%d" % i)  # returns at once: nothing waits for Redis
    redis.settle()
    assert len(local.payloads()) == 100
    assert a.backplane.dropped_overflow > 0  # the bound on bytes awaiting Redis
    assert a.backplane.pending_bytes <= 4096
    clock.advance(1)  # a PING goes out
    redis.settle()
    assert a.backplane.is_up
    clock.advance(2)  # and gets no answer in time
    redis.settle()
    assert not a.backplane.is_up
    assert a.bus.metrics.dropped["backplane_overflow"] == a.backplane.dropped_overflow
    redis.resume()
    clock.advance(1)
    redis.settle()
    assert a.backplane.is_up


def test_a_node_too_busy_to_read_its_pong_in_time_keeps_a_redis_that_talks(redis, clock):
    a, b = Node(redis, "a", health_interval=1.0, timeout=2.0), Node(redis, "b")
    up(redis, a, b)
    remote, sender = Peer(a.bus, "r"), Peer(b.bus, "s")
    redis.settle()
    redis.pong_delay = 5.0  # the PONGs come late, while publications keep arriving
    for i in range(24):
        sender.send(b"m%d" % i)
        clock.advance(0.5)
        redis.settle()
        assert a.backplane.is_up, f"taken for down after {(i + 1) / 2} s"
    assert remote.payloads() == [b"m%d" % i for i in range(24)]
    assert a.backplane.outages == 0
    sender.send(b"last")  # and a Redis that says nothing at all is still found out
    redis.settle()
    redis.stalled = True
    clock.advance(10)
    redis.settle()
    clock.advance(3)
    redis.settle()
    assert not a.backplane.is_up


def test_a_link_that_keeps_dropping_backs_off(redis, clock):
    a = Node(redis, "a")
    up(redis, a)
    endpoint = a.backplane._endpoint
    attempts = endpoint.attempts  # type: ignore[attr-defined]
    redis.kill()  # dropped at once after connecting: not "stable"
    assert endpoint.attempts == attempts  # type: ignore[attr-defined]
    clock.advance(0.5)
    redis.settle()
    assert a.backplane.is_up
    redis.kill()
    clock.advance(0.5)
    assert not a.backplane.is_up
    clock.advance(0.5)
    redis.settle()
    assert a.backplane.is_up


def test_password_is_sent_and_wrong_password_keeps_retrying(clock):
    redis = FakeRedis(clock, password=b"pw")
    a = Node(redis, "a")
    up(redis, a)
    redis.password = b"changed"
    redis.kill()
    clock.advance(1)
    redis.settle()
    assert not a.backplane.is_up


def test_malformed_publications_are_counted_not_fatal(redis):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    remote = Peer(b.bus, "r")
    redis.settle()
    subscriber = next(c for c in redis.connections if c.subscribed)
    junk = _array(_bulk(b"message"), _bulk(b"gw:main"), _bulk(b"junk"))
    subscriber.transport.write(junk)
    redis.settle()
    Peer(a.bus, "s").send(b"fine")
    redis.settle()
    assert remote.payloads() == [b"fine"]
    assert sum(node.backplane.inbox.malformed for node in (a, b)) == 1


@given(node=st.text(min_size=1, max_size=80), other=st.text(min_size=1, max_size=80))
def test_own_frames_are_recognised_before_decoding(node, other):
    mark = msgpack.packb(node)
    for frame in (
        encode_batch(node, Batch(Origin("p", "l", "t"), "c", [b"x"])),
        encode_presence(node, "join", Origin("p", "l", "t"), "c"),
    ):
        assert frame.startswith(mark, 3)
    theirs = encode_batch(other, Batch(Origin("p", "l", "t"), "c", [b"x"]))
    assert theirs.startswith(mark, 3) == (decode(theirs).node == node)


def test_a_node_listens_on_redis_only_for_what_its_peers_want(redis):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    room = Peer(b.bus, "r", channel="room.1")
    wide = Peer(b.bus, "w", channel="elsewhere")
    b.bus.subscribe(wide, "room.*")
    b.bus.subscribe(wide, "room.>")  # the same Redis glob as room.*: one PSUBSCRIBE
    redis.settle()
    listening = next(c for c in redis.connections if c.subscribed)
    assert sorted(listening.channels) == [b"gw:elsewhere", b"gw:room.1"]
    assert listening.patterns == [b"gw:room.*"]
    sender = Peer(a.bus, "s", channel="room.1")
    redis.settle()
    sender.send(b"once")  # Redis sends b a message and a pmessage: b takes one
    redis.settle()
    assert room.payloads() == [b"once"] and wide.payloads() == [b"once"]
    Peer(a.bus, "t", channel="room.2").send(b"by pattern")
    redis.settle()
    assert wide.payloads() == [b"once", b"by pattern"] and room.payloads() == [b"once"]
    b.bus.unsubscribe(wide, "room.*")
    redis.settle()
    assert listening.patterns == [b"gw:room.*"]  # room.> still wants it
    b.bus.unsubscribe(wide, "room.>")
    room.close("bye")
    redis.settle()
    assert listening.patterns == [] and listening.channels == [b"gw:elsewhere"]
    Peer(a.bus, "u", channel="room.1").send(b"nobody")
    redis.settle()
    assert wide.payloads() == [b"once", b"by pattern"]


class ReaderPeer(Peer):
    """A peer whose role may read room.> but never room.secret."""

    permissions = Permissions(
        [Role("reader", subscribe=("room.>",), deny_subscribe=("room.secret",))], "bob"
    )


def test_permissions_and_users_hold_across_nodes(redis):
    a, b = Node(redis, "a"), Node(redis, "b")
    up(redis, a, b)
    sender = Peer(a.bus, "tcp-1", channel="room.1")
    sender.origin = Origin("tcp-1", "test", "tcp", "alice")
    reader = ReaderPeer(b.bus, "tcp-9", channel="room.1")
    b.bus.subscribe(reader, "room.>")
    redis.settle()
    sender.send(b"to room 1")
    a.bus.publish(sender, Batch(sender.origin, "room.secret", [b"secret"]))
    a.bus.publish(sender, Batch(sender.origin, "room.2", [b"to room 2"]))
    redis.settle()
    assert reader.payloads() == [b"to room 1", b"to room 2"]  # once each, never the denied one
    assert {batch.origin.user for batch in reader.batches} == {"alice"}
    assert b.bus.metrics.denied == {}  # filtered where it is delivered, not refused
