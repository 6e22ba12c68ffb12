"""Hypothesis fuzzing of every receive path, in memory.

Whatever a peer sends - random bytes, broken HTTP, hostile WebSocket frames,
datagrams from any source - no exception escapes ``dataReceived`` or
``datagramReceived``, the bus counts exactly the peers that are attached, a
closed connection is detached and releases what it held, and honest receivers
of every kind (a fake ``IPeer``, a ``LineProtocol`` and two Autobahn clients,
raw and JSON) only ever get whole, well-formed output that agrees with what
was published.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from gateway.config import (
    Limits,
    ListenerConfig,
    TcpListenerConfig,
    UdpListenerConfig,
    WsListenerConfig,
)
from gateway.config.listeners import MAX_UDP_PAYLOAD
from gateway.core.bus import Bus
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin
from gateway.dtls.cookies import COOKIE_WINDOW
from gateway.flow.connection import Governor
from gateway.transports.datagram.server import DatagramServer
from gateway.transports.datagram.wire import (
    CHALLENGE,
    CHALLENGE_SIZE,
    CONTROL_PREFIX,
    HELLO,
    hello,
    response,
)
from gateway.transports.line import LINE_FRAMER
from gateway.transports.runtime import GatewayContext, ListenerRuntime
from gateway.transports.stream import StreamProtocol
from gateway.transports.tcp import StreamFactory
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL
from gateway.transports.websocket.peer import WebSocketPeer
from gateway.transports.websocket.site import WebSocketSite

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost:9000\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def runtime(bus: Bus, config: ListenerConfig, limits: Limits, clock: Clock) -> ListenerRuntime:
    """What a listener's protocols share, as the gateway builds it (a governor of its own)."""
    governor = Governor(limits, bus.metrics, clock)
    return ListenerRuntime(config, limits, GatewayContext(bus, governor, clock, "gw"))


def ws_site(bus: Bus, name: str, limits: Limits, clock: Clock) -> WebSocketSite:
    """The site of a ``ws`` listener without keepalive pings (their timers would linger)."""
    return WebSocketSite(
        runtime(bus, WsListenerConfig(name=name, ping_interval=0.0), limits, clock)
    )


# Honest receivers


@implementer(IFramer)
class BatchFramer:
    """Hands the receiver the batch itself: the record of what was published."""

    name = "fuzz-batch"

    def frame(self, batch: Batch) -> Batch:
        return batch

    def count(self, wire: Batch) -> int:
        return len(wire.payloads)


@implementer(IPeer)
class FakePeer:
    """An honest peer that records every ``deliver`` it gets, unchanged."""

    subject = None
    pending_bytes = 0
    dropped_messages = 0
    permissions = None

    def forbidden(self, action: str, channel: str) -> None:
        raise AssertionError(f"refused {action} {channel}")

    def __init__(self, bus: Bus, name: str, framer: IFramer) -> None:
        self.bus = bus
        self.origin = Origin(name, "fake", "fake")
        self.channel = "main"
        self.framer = framer
        self.echo = False
        self.address = "nowhere"
        self.received: list[Any] = []
        bus.attach(self)

    def deliver(self, wire: Any) -> None:
        self.received.append(wire)

    def close(self, reason: str) -> None:
        raise AssertionError(f"an honest peer was closed: {reason}")


class WriteLog(StringTransport):
    """A StringTransport that also keeps each write apart."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class ContractTransport(WriteLog):
    """``loseConnection`` as ``ITransport`` documents it, and as the TLS transport does it.

    "If there is a registered producer on a transport it will not be closed
    until the producer has been unregistered." (TCP happens to close anyway;
    ``TLSMemoryBIOProtocol`` waits.) ``StringTransport`` closes at once, which
    would hide a protocol that asks to close while its producer is registered.
    """

    close_requested = False

    def loseConnection(self) -> None:
        if self.producer is not None:
            self.close_requested = True
            return
        super().loseConnection()

    def abortConnection(self) -> None:
        self.disconnected = True
        super().loseConnection()  # abort closes, producer or not

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        if self.close_requested:
            super().loseConnection()


class Client(WebSocketClientProtocol):
    """Autobahn's client: its parser is the judge of the frames we send."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        self.messages.append((payload, is_binary))

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (was_clean, code, reason)


def connect_client(
    site: Any, clock: Clock, protocols: list[str] | None = None
) -> tuple[Client, iosim.IOPump, iosim.FakeTransport]:
    server = site.buildProtocol(CLIENT_ADDRESS)
    factory = WebSocketClientFactory(
        url="ws://localhost:9000/ws", protocols=protocols or [], reactor=clock
    )
    # The client's own timers would go to the global reactor.
    factory.setProtocolOptions(
        openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
    )
    factory.protocol = Client
    client = factory.buildProtocol(None)
    assert isinstance(client, Client)
    server_io = iosim.FakeTransport(server, isServer=True, peerAddress=CLIENT_ADDRESS)
    client_io = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(server, server_io, client, client_io, clock=clock)
    return client, pump, server_io


class Honest:
    """One honest receiver of each kind, attached to ``bus`` before anyone hostile."""

    count = 5

    def __init__(self, bus: Bus, clock: Clock) -> None:
        self.bus = bus
        self.record = FakePeer(bus, "record", BatchFramer())
        self.lines = FakePeer(bus, "lines", LINE_FRAMER)
        factory = StreamFactory(runtime(bus, TcpListenerConfig(name="honest-tcp"), Limits(), clock))
        self.line_peer = factory.buildProtocol(None)
        self.line_io = WriteLog()
        self.line_peer.makeConnection(self.line_io)
        site = ws_site(bus, "honest-ws", Limits(handshake_timeout=5.0), clock)
        self.raw, self.raw_pump, self.raw_io = connect_client(site, clock)
        self.json, self.json_pump, self.json_io = connect_client(site, clock, [JSON_SUBPROTOCOL])
        self.json_pump.flush()
        self.json.messages.clear()  # the welcome
        self.peers: set[Any] = {
            self.record,
            self.lines,
            self.line_peer,
            self.raw_io.protocol,
            self.json_io.protocol,
        }
        assert bus.peer_count == self.count
        assert set(bus.peers()) == self.peers

    def batches(self) -> list[Batch]:
        return list(self.record.received)

    def check(self) -> list[tuple[Batch, bytes, Kind]]:
        """Every honest receiver got exactly what was published, whole; returns it."""
        published = [
            (batch, payload, kind) for batch in self.batches() for payload, kind in batch.messages()
        ]
        framed = [payload + b"\n" for _, payload, _ in published]
        # Line receivers: one write per batch, each of whole lines, all in order.
        for wire in self.lines.received:
            assert wire.endswith(b"\n"), wire
        for wire in self.line_io.writes:
            assert wire.endswith(b"\n"), wire
        assert b"".join(self.lines.received) == b"".join(framed)
        assert self.line_io.value() == b"".join(framed)
        assert not self.line_io.disconnecting
        # WebSocket receivers: Autobahn's client parser accepts every frame.
        self.raw_pump.flush()
        self.json_pump.flush()
        assert self.raw.closed is None
        assert self.json.closed is None
        assert self.raw.messages == [(p, k is Kind.BINARY) for _, p, k in published]
        envelopes = [json.loads(text) for text, binary in self.json.messages if not binary]
        assert len(envelopes) == len(self.json.messages)
        messages = [e for e in envelopes if e["type"] == "message"]
        assert len(messages) == len(published)
        for envelope, (batch, payload, kind) in zip(messages, published, strict=True):
            assert envelope["from"] == batch.origin.peer_id
            if "text" in envelope:
                assert kind is Kind.TEXT
                assert envelope["text"].encode("utf-8") == payload
            else:
                assert kind is Kind.BINARY
                assert base64.b64decode(envelope["base64"]) == payload
        return published


# Line protocol


def line_model(stream: bytes, limit: int, quit: bytes | None) -> tuple[list[bytes], bool]:
    """What the line rules make of ``stream``: the messages, and whether it closes."""
    *complete, partial = stream.split(b"\n")
    messages: list[bytes] = []
    for raw in complete:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            continue
        if len(line) > limit or line == quit:
            return messages, True
        messages.append(line)
    return messages, len(partial) > limit + 1


@dataclass(frozen=True)
class LineSetup:
    limits: Limits
    quit_command: str = ""
    echo: bool = False


LINE_SETUPS = [
    LineSetup(Limits()),
    LineSetup(Limits(), quit_command="quit"),
    LineSetup(Limits(max_message_bytes=16), quit_command="quit", echo=True),
]
line_tokens = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(
        [
            b"\n",
            b"\r\n",
            b"\r",
            b"\r\r\n",
            b"quit",
            b"quit\n",
            b"\nquit\r\n",
            b"\xff\xfe",
            b"x" * 17,
        ]
    ),
    st.text(max_size=8).map(lambda text: text.encode("utf-8")),
)
streams = st.lists(line_tokens, max_size=30).map(b"".join)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@FUZZ
@given(st.sampled_from(LINE_SETUPS), st.lists(streams, min_size=1, max_size=3), st.data())
def test_line_protocol_survives_any_bytes_and_relays_only_whole_lines(setup, sent, data):
    bus, clock = Bus(), Clock()
    honest = Honest(bus, clock)
    listener = TcpListenerConfig(name="fuzz", quit_command=setup.quit_command, echo=setup.echo)
    factory = StreamFactory(runtime(bus, listener, setup.limits, clock))
    senders: list[StreamProtocol] = []
    ios: list[ContractTransport] = []
    for _ in sent:
        io = ContractTransport()
        sender = factory.buildProtocol(None)
        sender.makeConnection(io)
        senders.append(sender)
        ios.append(io)
    chunks = [
        cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6))) for stream in sent
    ]
    order = data.draw(st.permutations([i for i, c in enumerate(chunks) for _ in c]))
    got: list[list[bytes]] = [[] for _ in sent]
    seen = 0
    for index in order:
        senders[index].dataReceived(chunks[index].pop(0))
        batches = honest.batches()
        for batch in batches[seen:]:
            assert batch.origin is senders[index].origin  # only the one that spoke
            got[index].extend(batch.payloads)
        seen = len(batches)
        # Attached until the gateway asks to close (or closes), not until it is closed.
        open_senders = {
            s
            for s, io in zip(senders, ios, strict=True)
            if not (io.disconnecting or io.close_requested)
        }
        assert set(bus.peers()) == honest.peers | open_senders
        assert bus.peer_count == Honest.count + len(open_senders)

    quit_line = setup.quit_command.encode() or None
    everything = {m for stream in sent for m in line_model(stream, 10**9, None)[0]}
    for stream, sender_got, io in zip(sent, got, ios, strict=True):
        messages, closes = line_model(stream, setup.limits.max_message_bytes, quit_line)
        assert sender_got == messages
        assert (io.disconnecting or io.close_requested) == closes
        # Asked to close, it must really close: with its producer still registered,
        # a TLS transport never would (see ContractTransport).
        assert io.disconnecting == closes, (
            "loseConnection() was called with the backlog still registered as the "
            "transport's producer: over TLS the connection would never close"
        )
        for wire in io.writes:  # senders hear each other: whole lines only
            assert wire.endswith(b"\n")
            for line in wire[:-1].split(b"\n"):
                assert line in everything or line.startswith(b"gateway: message too long")
    honest.check()

    for sender in senders:
        sender.connectionLost(Failure(ConnectionDone()))
    assert bus.peer_count == Honest.count
    assert set(bus.peers()) == honest.peers
    assert factory.runtime.connections == set()
    assert factory.runtime.governor.gate.total == 0
    assert factory.runtime.governor.backpressure.total_pending == 0
    assert clock.getDelayedCalls() == []


# Datagrams


Address = tuple[str, int]
LOOPBACK_SOURCES: list[Address] = [
    (host, port)
    for host in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1")
    for port in (1, 65535)
]
OTHER_SOURCES: list[Address] = [("10.0.0.1", 1000), ("::ffff:10.0.0.1", 1000), ("2001:db8::1", 9)]
_LOOPBACK = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))


def _ip(host: str) -> Any:
    ip = ip_address(host)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class UdpModel:
    """The UDP rules of docs/protocol.md, as a reference to compare the listener with."""

    def __init__(
        self, echo: bool, challenge: bool, limit: int, max_peers: int, timeout: float
    ) -> None:
        self.echo = echo
        self.challenge = challenge
        self.limit = limit
        self.max_peers = max_peers
        self.timeout = timeout
        self.now = 0.0
        self.peers: dict[Address, float] = {}  # address -> last refresh
        self.cookies: dict[tuple[Any, int], set[tuple[bytes, int]]] = {}
        self.relayed: list[bytes] = []

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for address, last in list(self.peers.items()):
            if last + self.timeout <= self.now:
                del self.peers[address]

    def issued(self, address: Address, datagram: bytes) -> None:
        """The listener sent a challenge to ``address``."""
        key = (_ip(address[0]), address[1])
        self.cookies.setdefault(key, set()).add((datagram[len(CHALLENGE) :], self.window()))

    def window(self) -> int:
        return int(self.now // COOKIE_WINDOW)

    def cookie_for(self, address: Address) -> bytes | None:
        """The newest cookie sent to ``address``, if any."""
        issued = self.cookies.get((_ip(address[0]), address[1]))
        if not issued:
            return None
        return max(issued, key=lambda item: item[1])[0]

    def receive(self, datagram: bytes, address: Address) -> tuple[list[Any], bool]:
        """(the expected sends - bytes, or "challenge" - and whether one is answered)."""
        received = len(datagram)
        if datagram.endswith(b"\n"):
            datagram = datagram[:-2] if datagram.endswith(b"\r\n") else datagram[:-1]
        control = datagram.startswith(CONTROL_PREFIX)
        if address in self.peers:
            if not datagram or control:
                self.peers[address] = self.now
                return [], False
            if len(datagram) > self.limit:
                return [], False
            self.peers[address] = self.now
            return self._relay(address, datagram), False
        if not any(_ip(address[0]) in net for net in _LOOPBACK):
            return [], False
        if not control and len(datagram) > self.limit:
            return [], False
        if not self.challenge:
            if len(self.peers) < self.max_peers:
                self.peers[address] = self.now
                if datagram and not control:
                    return self._relay(address, datagram), False
            return [], False
        verb, _, rest = datagram[len(CONTROL_PREFIX) + 1 :].partition(b" ")
        if control and verb == b"response":
            cookie = rest.partition(b" ")[0]
            issued = self.cookies.get((_ip(address[0]), address[1]), set())
            if any((cookie, w) in issued for w in (self.window(), self.window() - 1)):
                if len(self.peers) < self.max_peers:
                    self.peers[address] = self.now
                return [], False
        return [], received >= CHALLENGE_SIZE

    def _relay(self, sender: Address, payload: bytes) -> list[Any]:
        self.relayed.append(payload)
        wire = payload + b"\n"
        if len(wire) > MAX_UDP_PAYLOAD:
            return []
        return [(wire, a) for a in self.peers if a != sender or self.echo]


class FakeUDPTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []

    def write(self, datagram: bytes, addr: Address) -> None:
        self.sent.append((datagram, addr))


@st.composite
def datagram_actions(draw: Any, limit: int, sources: list[Address]) -> Any:
    kind = draw(st.sampled_from(["send"] * 6 + ["answer"] * 2 + ["advance"]))
    if kind == "advance":
        return ("advance", draw(st.sampled_from([0.5, 0.5, 5.0, 10.0, 31.0])))
    source = draw(st.sampled_from(sources))
    if kind == "answer":
        return ("answer", source, draw(st.sampled_from([b"", b" pad", b"\n", b" x\r\n"])))
    payload = draw(
        st.one_of(
            st.binary(max_size=80),
            st.sampled_from(
                [b"", b"\n", b"\r\n", b"\n\n", b"a\nb", HELLO, hello(), hello() + b"\n"]
            ),
            st.binary(max_size=60).map(lambda tail: CONTROL_PREFIX + tail),
            st.builds(
                lambda size, end: b"y" * size + end,
                st.sampled_from(
                    [0, 46, 47, limit - 1, limit, limit + 1, min(limit + 2, MAX_UDP_PAYLOAD)]
                ),
                st.sampled_from([b"", b"\n", b"\r\n"]),
            ),
        )
    )
    return ("send", source, payload)


@FUZZ
@given(
    echo=st.booleans(),
    challenge=st.booleans(),
    limit=st.sampled_from([20, 64, MAX_UDP_PAYLOAD]),
    max_peers=st.sampled_from([2, 1024]),
    data=st.data(),
)
def test_datagram_listener_survives_any_datagram_from_any_source(
    echo, challenge, limit, max_peers, data
):
    bus, clock = Bus(), Clock()
    honest = Honest(bus, clock)
    config = UdpListenerConfig(
        name="udp", echo=echo, peer_timeout=10.0, max_peers=max_peers, challenge=challenge
    )
    listener = DatagramServer(runtime(bus, config, Limits(max_message_bytes=limit), clock))
    transport = FakeUDPTransport()
    listener.transport = transport  # type: ignore[assignment]
    listener.startProtocol()
    model = UdpModel(echo, challenge, min(limit, MAX_UDP_PAYLOAD), max_peers, 10.0)
    # A few sources per example, so that they come back: mostly loopback (allowed).
    sources = data.draw(
        st.lists(st.sampled_from(LOOPBACK_SOURCES), min_size=1, max_size=3, unique=True)
    ) + data.draw(st.lists(st.sampled_from(OTHER_SOURCES), max_size=1))
    for action in data.draw(st.lists(datagram_actions(limit, sources), min_size=1, max_size=25)):
        if action[0] == "advance":
            clock.advance(action[1])
            model.advance(action[1])
        else:
            source = action[1]
            if action[0] == "answer":
                cookie = model.cookie_for(source)
                datagram = response(cookie if cookie is not None else b"0" * 32) + action[2]
            else:
                datagram = action[2]
            before = len(transport.sent)
            expected, answered = model.receive(datagram, source)
            listener.datagramReceived(datagram, source)
            sent = transport.sent[before:]
            challenges = [(d, a) for d, a in sent if d.startswith(CHALLENGE)]
            assert Counter(sent) == Counter(expected) + Counter(challenges)
            assert len(challenges) == int(answered)
            if action[0] == "answer" and challenge and source in model.peers:
                event("a source passed the challenge")
            for reply, address in challenges:
                # Never more bytes to an unverified source than it sent.
                assert address == source and address not in model.peers
                assert len(reply) == CHALLENGE_SIZE <= len(datagram)
                model.issued(address, reply)
        assert set(listener.peers) == set(model.peers)
        assert bus.peer_count == Honest.count + len(model.peers)
    published = honest.check()
    assert [payload for _, payload, _ in published] == model.relayed
    event(f"relayed {min(len(published), 2)}, peers {min(len(model.peers), 2)}")
    listener.stopProtocol()
    assert bus.peer_count == Honest.count
    assert clock.getDelayedCalls() == []


# WebSocket: the HTTP request before the upgrade


http_tokens = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            UPGRADE,
            UPGRADE[:-2],
            b"GET /ws HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\n",
            b"POST /ws HTTP/1.1\r\n",
            b"GET /ws HTTP/1.0\r\n",
            b"GET /nope HTTP/1.1\r\n",
            b"\r\n",
            b"\n",
            b"\r\n\r\n",
            b"Host: localhost:9000\r\n",
            b"Upgrade: websocket\r\n",
            b"Connection: Upgrade\r\n",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"Sec-WebSocket-Version: 13\r\n",
            b"Origin: http://evil.example\r\n",
            b"Origin: null\r\n",
            b"Sec-WebSocket-Protocol: gateway.v1.json\r\n",
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: -1\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"0\r\n\r\n",
        ]
    ),
    st.builds(
        lambda name, value: name + b": " + value + b"\r\n",
        st.sampled_from(
            [
                b"Host",
                b"Origin",
                b"Sec-WebSocket-Key",
                b"Sec-WebSocket-Version",
                b"Sec-WebSocket-Protocol",
                b"Sec-WebSocket-Extensions",
                b"Upgrade",
                b"Connection",
            ]
        ),
        st.binary(max_size=30),
    ),
)
UPGRADE_HEADERS = {
    b"Host": b"localhost:9000",
    b"Upgrade": b"websocket",
    b"Connection": b"Upgrade",
    b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version": b"13",
    b"Origin": b"http://localhost:9000",
    b"Sec-WebSocket-Protocol": b"gateway.v1.json",
}


@st.composite
def mutated_upgrade(draw: Any) -> bytes:
    """A whole upgrade request with some header values replaced by random bytes."""
    headers = dict(UPGRADE_HEADERS)
    for name in draw(st.lists(st.sampled_from(sorted(headers)), max_size=3)):
        headers[name] = draw(st.binary(max_size=30).map(lambda v: v.replace(b"\n", b"")))
    lines = [b"GET /ws HTTP/1.1", *(n + b": " + v for n, v in headers.items())]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def new_connection(site: Any) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(CLIENT_ADDRESS)
    transport = ContractTransport(peerAddress=CLIENT_ADDRESS)
    transport.protocol = channel  # type: ignore[attr-defined]  # as on a real transport
    channel.makeConnection(transport)
    return channel, transport


def lose(transport: StringTransport) -> None:
    protocol: Any = transport.protocol  # type: ignore[attr-defined]
    protocol.connectionLost(Failure(ConnectionDone()))


@FUZZ
@given(
    st.one_of(
        st.lists(http_tokens, min_size=1, max_size=12).map(b"".join),
        st.binary(min_size=1, max_size=400),
        st.tuples(mutated_upgrade(), st.binary(max_size=40)).map(b"".join),
    ),
    st.data(),
)
def test_http_channel_survives_any_bytes_before_the_upgrade(request, data):
    bus, clock = Bus(), Clock()
    honest = Honest(bus, clock)
    limits = Limits(max_message_bytes=100, handshake_timeout=2.0)
    site = ws_site(bus, "fuzz-ws", limits, clock)
    _, transport = new_connection(site)
    for chunk in cut(request, data.draw(st.lists(st.integers(0, len(request)), max_size=5))):
        if transport.disconnecting:
            break  # a real transport stops reading once it is closing
        transport.protocol.dataReceived(chunk)  # type: ignore[attr-defined]
    reply = transport.value()
    assert reply == b"" or reply.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), reply[:80]
    protocol: Any = transport.protocol  # type: ignore[attr-defined]
    # Opened: it got a peer id (a refused handshake leaves a WebSocketPeer without one).
    upgraded = isinstance(protocol, WebSocketPeer) and bool(protocol.origin.peer_id)
    if upgraded:
        assert b"HTTP/1.1 101 " in reply
    event("upgraded" if upgraded else f"reply {reply[:12]!r}")
    assert bus.peer_count == Honest.count + (protocol in bus.peers())
    if not upgraded:
        assert bus.peer_count == Honest.count
        assert honest.batches() == []
    # Past the deadline a connection is closed or an open WebSocket: nothing lingers.
    clock.advance(limits.handshake_timeout + 0.1)
    clock.advance(limits.handshake_timeout + 0.1)
    if not transport.disconnecting:
        assert upgraded
        assert protocol.state == protocol.STATE_OPEN
        assert protocol in bus.peers()
    lose(transport)
    assert bus.peer_count == Honest.count
    assert site.runtime.connections == set()
    assert site.runtime.governor.gate.total == 0
    honest.check()
    assert clock.getDelayedCalls() == []


# WebSocket: frames after the upgrade


def mask(payload: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def client_frame(
    opcode: int, payload: bytes, fin: bool = True, key: bytes | None = None, rsv: int = 0
) -> bytes:
    """One client frame, masked with ``key`` unless it is None, minimal length encoding."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    length = len(payload)
    masked = 0x80 if key is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, masked | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, masked | 126, length)
    else:
        head = struct.pack("!BBQ", first, masked | 127, length)
    if key is None:
        return head + payload
    return head + key + mask(payload, key)


keys = st.binary(min_size=4, max_size=4)
LIMIT = 100


@st.composite
def honest_message(draw: Any, json_client: bool = False) -> tuple[bytes, bool, bytes]:
    """(the message published, is it binary, its frames): fragmented, pings in between."""
    shapes = ["text", "binary"] + (["envelope text", "envelope base64"] if json_client else [])
    shape = draw(st.sampled_from(shapes))
    if shape == "binary":
        payload = sent = draw(st.binary(max_size=LIMIT))
    elif shape == "text":
        payload = sent = draw(st.text(max_size=LIMIT // 4)).encode("utf-8")
    elif shape == "envelope text":
        text = draw(st.text(max_size=5))
        payload, sent = text.encode("utf-8"), json.dumps({"type": "message", "text": text}).encode()
    else:
        payload = draw(st.binary(max_size=30))
        encoded = base64.b64encode(payload).decode()
        sent = json.dumps({"type": "message", "base64": encoded}).encode()
    binary = shape in ("binary", "envelope base64")
    points = sorted(set(draw(st.lists(st.integers(0, len(sent)), max_size=3))))
    pieces = [sent[a:b] for a, b in zip([0, *points], [*points, len(sent)], strict=True)]
    frames = []
    for i, piece in enumerate(pieces):
        opcode = (0x2 if shape == "binary" else 0x1) if i == 0 else 0x0
        frames.append(client_frame(opcode, piece, fin=i == len(pieces) - 1, key=draw(keys)))
        if draw(st.booleans()):
            ping = draw(st.binary(max_size=125))
            frames.append(client_frame(draw(st.sampled_from([0x9, 0xA])), ping, key=draw(keys)))
    return payload, binary, b"".join(frames)


def upgraded_peer(
    bus: Bus, clock: Clock, json_client: bool = False
) -> tuple[Any, WebSocketPeer, StringTransport, Limits]:
    limits = Limits(max_message_bytes=LIMIT, handshake_timeout=2.0)
    site = ws_site(bus, "fuzz-ws", limits, clock)
    channel, transport = new_connection(site)
    protocols = b"Sec-WebSocket-Protocol: " + JSON_SUBPROTOCOL.encode() + b"\r\n"
    channel.dataReceived(UPGRADE[:-2] + protocols + b"\r\n" if json_client else UPGRADE)
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    transport.clear()
    peer = transport.protocol  # type: ignore[attr-defined]
    assert isinstance(peer, WebSocketPeer)
    return site, peer, transport, limits


@FUZZ
@given(
    st.booleans().flatmap(
        lambda json_client: st.tuples(
            st.just(json_client), st.lists(honest_message(json_client), max_size=6)
        )
    ),
    st.data(),
)
def test_well_formed_frames_in_any_split_are_relayed_exactly(sent, data):
    json_client, messages = sent
    bus, clock = Bus(), Clock()
    honest = Honest(bus, clock)
    _, peer, transport, _ = upgraded_peer(bus, clock, json_client)
    stream = b"".join(frames for _, _, frames in messages)
    for chunk in cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8))):
        peer.dataReceived(chunk)
    assert not transport.disconnecting
    assert peer.state == peer.STATE_OPEN
    published = honest.check()
    assert [(p, k is Kind.BINARY) for _, p, k in published] == [(p, b) for p, b, _ in messages]
    assert all(batch.origin is peer.origin for batch, _, _ in published)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=4,
)
json_texts = st.one_of(
    st.builds(
        lambda key, value: json.dumps({"type": "message", key: value}).encode(),
        st.sampled_from(["text", "base64", "type"]),
        json_values,
    ),
    st.sampled_from(
        [
            b'{"type":"message","text":"\\ud800"}',
            b'{"type":"message","base64":"!!"}',
            b'{"type":"message","base64":"AAE"}',
            b'{"type":"message"',
            b"[" * 60,
            b"{" * 60,
            b'{"type":"message","text":1e999}',
        ]
    ),
)


@st.composite
def hostile_frame(draw: Any) -> bytes:
    """A frame with any opcode, flags, mask bit and length (declared and actual)."""
    opcode = draw(st.integers(0, 15))
    fin = draw(st.booleans())
    rsv = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 7]))
    masked = draw(st.sampled_from([True, True, True, False]))
    payload: bytes = draw(
        st.one_of(
            st.binary(max_size=LIMIT + 20),
            st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"ok \xf4\x90\x80\x80", b"\x03"]),
            st.builds(
                lambda code, why: struct.pack("!H", code) + why,
                st.integers(0, 65535),
                st.binary(max_size=10),
            ),
        )
    )
    declared = draw(
        st.one_of(
            st.just(len(payload)),
            st.integers(0, 2**16),
            st.sampled_from([2**62, 2**63, 2**64 - 1, 126, 65535, 65536]),
        )
    )
    encoding = draw(st.sampled_from(["minimal", "minimal", "16", "64"]))
    if encoding == "minimal":
        encoding = "7" if declared < 126 else "16" if declared < 65536 else "64"
    if encoding == "16" and declared >= 65536:
        encoding = "64"
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if encoding == "7":
        head = struct.pack("!BB", first, bit | declared)
    elif encoding == "16":
        head = struct.pack("!BBH", first, bit | 126, declared)
    else:
        head = struct.pack("!BBQ", first, bit | 127, declared)
    body = payload[:declared]
    if masked:
        key: bytes = draw(keys)
        return head + key + mask(body, key)
    return head + body


hostile_streams = st.lists(
    st.one_of(
        hostile_frame(),
        honest_message(json_client=True).map(lambda m: m[2]),
        st.tuples(json_texts, keys).map(lambda t: client_frame(0x1, t[0], key=t[1])),
        st.binary(max_size=30),
    ),
    max_size=8,
).map(b"".join)


@FUZZ
@given(st.booleans(), hostile_streams, st.data())
def test_hostile_frames_never_escape_and_never_reach_others_corrupt(json_client, stream, data):
    bus, clock = Bus(), Clock()
    honest = Honest(bus, clock)
    site, peer, transport, limits = upgraded_peer(bus, clock, json_client)
    for chunk in cut(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8))):
        if transport.disconnecting:
            break  # a real transport stops reading once it is closing
        peer.dataReceived(chunk)
        # Attached while open; a peer that is being dropped has already left the bus.
        if peer.state == peer.STATE_OPEN and not transport.disconnecting:
            assert bus.peer_count == Honest.count + 1
        else:
            assert bus.peer_count in (Honest.count, Honest.count + 1)
    published = honest.check()
    event(f"published {min(len(published), 2)}, state {peer.state}")
    for batch, payload, kind in published:
        assert batch.origin is peer.origin
        assert len(payload) <= limits.max_message_bytes
        if kind is Kind.TEXT:
            payload.decode("utf-8")  # text frames with invalid UTF-8 are refused
    if peer.state != peer.STATE_OPEN:
        # A peer that failed the protocol goes at the close handshake deadline.
        clock.advance(limits.handshake_timeout + 0.1)
        assert transport.disconnecting
    lose(transport)
    assert bus.peer_count == Honest.count
    assert set(bus.peers()) == honest.peers
    assert site.runtime.connections == set()
    assert site.runtime.governor.gate.total == 0
    assert clock.getDelayedCalls() == []
    honest.check()


def test_random_bytes_after_the_upgrade_are_a_protocol_error_not_a_crash():
    """A non-hypothesis smoke test of the same path with os.urandom, many times."""
    for _ in range(50):
        bus, clock = Bus(), Clock()
        honest = Honest(bus, clock)
        _, peer, transport, limits = upgraded_peer(bus, clock)
        garbage = os.urandom(2048)
        peer.dataReceived(bytes([garbage[0] | 0x40]) + garbage[1:])  # RSV1: never valid here
        assert transport.value()[:1] == b"\x88"  # a close frame first
        assert struct.unpack("!H", transport.value()[2:4])[0] == 1002
        clock.advance(limits.handshake_timeout + 0.1)
        assert transport.disconnecting
        lose(transport)
        assert bus.peer_count == Honest.count
        assert honest.check() == []
