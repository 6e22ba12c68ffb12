"""The WebSocket listener in memory: frames, JSON envelopes, presence, origins, limits.

WebSocket clients are Autobahn's own client protocol, connected to the
listener's site over ``iosim``; plain HTTP is driven through a
``StringTransport``. Time is a ``Clock``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.bus import Bus
from gateway.config import Limits, StreamListenerConfig
from gateway.flow import Backlog
from gateway.interfaces import IFramer, IPeer
from gateway.message import Batch, Kind, Origin
from gateway.websocket import (
    JSON_FRAMER,
    JSON_SUBPROTOCOL,
    RAW_FRAMER,
    OriginPolicy,
    WebSocketPeer,
    frame_header,
    frame_message,
    make_site,
    parse_envelope,
)

CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def listener(**overrides: object) -> StreamListenerConfig:
    values: dict[str, object] = {
        "name": "web",
        "type": "ws",
        "host": "127.0.0.1",
        "port": 0,
        "channel": "main",
        "echo": False,
        "welcome": "",
        "quit_command": "",
        "ping_interval": 0.0,
        "allowed_origins": None,
    }
    values.update(overrides)
    return StreamListenerConfig(**values)  # type: ignore[arg-type]


@implementer(IFramer)
class BatchFramer:
    """Hands receivers the batch itself, so tests can look at it."""

    name = "test"

    def frame(self, batch: Batch) -> Batch:
        return batch


BATCH_FRAMER = BatchFramer()


@implementer(IPeer)
class LinePeer:
    """A stand-in for a tcp/udp peer: sends untyped bytes, records what it gets."""

    def __init__(self, bus: Bus, peer_id: str = "tcp-1", transport: str = "tcp") -> None:
        self.bus = bus
        self.origin = Origin(peer_id, transport, transport)
        self.channel = "main"
        self.framer = BATCH_FRAMER
        self.echo = False
        self.address = "127.0.0.1:1"
        self.received: list[Batch] = []
        self.closed: list[str] = []
        bus.attach(self)

    def send(self, *payloads: bytes, kinds: list[Kind] | None = None) -> None:
        lines = None if kinds is not None else b"".join(p + b"\n" for p in payloads)
        self.bus.publish(self, Batch(self.origin, self.channel, list(payloads), kinds, lines))

    def deliver(self, wire: Batch) -> None:
        self.received.append(wire)

    def close(self, reason: str) -> None:
        self.closed.append(reason)
        self.bus.detach(self)

    def payloads(self) -> list[tuple[bytes, Kind]]:
        return [message for batch in self.received for message in batch.messages()]


class Client(WebSocketClientProtocol):
    """Autobahn's client, recording what it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.messages: list[tuple[bytes, bool]] = []
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        self.messages.append((payload, is_binary))

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (was_clean, code, reason)

    def texts(self) -> list[str]:
        return [payload.decode() for payload, binary in self.messages if not binary]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.texts()]

    def take(self) -> list[tuple[bytes, bool]]:
        messages, self.messages = self.messages, []
        return messages


class Connection:
    """A client connected to the site over iosim, and the server's peer."""

    def __init__(self, client: Client, pump: iosim.IOPump, server_io: iosim.FakeTransport) -> None:
        self.client = client
        self.pump = pump
        self.server_io = server_io

    @property
    def peer(self) -> WebSocketPeer:
        protocol = self.server_io.protocol
        assert isinstance(protocol, WebSocketPeer)
        return protocol

    def send(self, payload: bytes, binary: bool = False) -> None:
        self.client.sendMessage(payload, isBinary=binary)
        self.pump.flush()

    def send_json(self, value: object) -> None:
        self.send(json.dumps(value).encode())


class Gateway:
    """A bus, a clock and the site of one WebSocket listener."""

    def __init__(self, limits: Limits | None = None, **overrides: object) -> None:
        self.bus = Bus()
        self.clock = Clock()
        self.limits = limits or Limits(handshake_timeout=5.0)
        self.site = make_site(self.bus, listener(**overrides), self.limits, "gw", self.clock)

    def connect(
        self,
        protocols: list[str] | None = None,
        origin: str | None = None,
        url: str = "ws://localhost:9000/ws",
    ) -> Connection:
        server = self.site.buildProtocol(CLIENT_ADDRESS)
        factory = WebSocketClientFactory(
            url=url, origin=origin, protocols=protocols or [], reactor=self.clock
        )
        # The client's own timers would go to the global reactor; the server's are tested.
        factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, serverConnectionDropTimeout=0
        )
        factory.protocol = Client
        client = factory.buildProtocol(None)
        assert isinstance(client, Client)
        server_io = iosim.FakeTransport(server, isServer=True, peerAddress=CLIENT_ADDRESS)
        client_io = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_io, client, client_io, clock=self.clock)
        return Connection(client, pump, server_io)

    def json_client(self) -> Connection:
        return self.connect(protocols=[JSON_SUBPROTOCOL])

    def http(self, request: bytes) -> StringTransport:
        """Send raw HTTP bytes on a new connection; the transport holds the reply."""
        channel = self.site.buildProtocol(CLIENT_ADDRESS)
        transport = StringTransport(peerAddress=CLIENT_ADDRESS)
        transport.protocol = channel  # type: ignore[attr-defined]  # as on a real transport
        channel.makeConnection(transport)
        if request:
            channel.dataReceived(request)
        return transport


def upgrade_request(
    origin: str | None = None, host: str = "localhost:9000", protocols: str | None = None
) -> bytes:
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(transport: StringTransport) -> int:
    first = transport.value().split(b"\r\n", 1)[0]
    return int(first.split()[1])


# The frame builder


def test_frame_header_lengths():
    assert frame_header(0, 1) == b"\x81\x00"
    assert frame_header(125, 2) == b"\x82\x7d"
    assert frame_header(126, 1) == b"\x81\x7e\x00\x7e"
    assert frame_header(65535, 1) == b"\x81\x7e\xff\xff"
    assert frame_header(65536, 2) == b"\x82\x7f" + (65536).to_bytes(8, "big")
    assert frame_message(b"hi", 1) == b"\x81\x02hi"


LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def test_autobahn_decodes_our_frames_text_and_binary():
    gw = Gateway()
    ws = gw.connect()
    tcp = LinePeer(gw.bus)
    payloads = [bytes([65 + n % 26]) * n for n in LENGTHS]
    binaries = [bytes([n % 256 for n in range(length)]) for length in LENGTHS]
    tcp.send(
        *payloads, *binaries, kinds=[Kind.TEXT] * len(payloads) + [Kind.BINARY] * len(binaries)
    )
    ws.pump.flush()
    assert ws.client.messages == [(p, False) for p in payloads] + [(b, True) for b in binaries]
    assert ws.client.closed is None


def test_each_receiver_gets_one_write_per_batch():
    gw = Gateway()
    receivers = [gw.connect() for _ in range(3)]
    writes: list[list[bytes]] = []
    for connection in receivers:
        log: list[bytes] = []
        writes.append(log)
        connection.peer.transport.write = log.append  # type: ignore[union-attr, method-assign]
    LinePeer(gw.bus).send(b"one", b"two", b"three")
    assert [len(log) for log in writes] == [1, 1, 1]
    assert writes[0][0] == writes[1][0] == writes[2][0]
    assert writes[0][0] == b"\x81\x03one\x81\x03two\x81\x05three"


# Raw clients


def test_websocket_to_websocket_keeps_the_opcode():
    gw = Gateway()
    a, b = gw.connect(), gw.connect()
    a.send("héllo".encode())
    a.send(b"\x00\x01\xff", binary=True)
    a.send(b"plain text that is ascii", binary=True)
    b.pump.flush()
    assert b.client.take() == [
        ("héllo".encode(), False),
        (b"\x00\x01\xff", True),
        (b"plain text that is ascii", True),
    ]
    assert a.client.messages == []  # no echo by default


def test_echo_sends_own_messages_back():
    gw = Gateway(echo=True)
    a = gw.connect()
    a.send(b"me")
    a.pump.flush()
    assert a.client.take() == [(b"me", False)]


def test_websocket_messages_reach_line_peers_with_their_kind_and_origin():
    gw = Gateway(type="wss", name="secure")
    tcp = LinePeer(gw.bus)
    ws = gw.connect()
    ws.send(b"text")
    ws.send(b"\xff\x00", binary=True)
    ws.send(b"", binary=False)
    assert tcp.payloads() == [(b"text", Kind.TEXT), (b"\xff\x00", Kind.BINARY), (b"", Kind.TEXT)]
    origin = tcp.received[0].origin
    assert (origin.peer_id, origin.listener, origin.transport) == ("secure-1", "secure", "wss")
    assert ws.peer.origin is origin


def test_line_transport_bytes_are_text_when_utf8_else_binary():
    gw = Gateway()
    ws = gw.connect()
    tcp = LinePeer(gw.bus)
    tcp.send(b"ascii", "ünïcode".encode(), b"\xff\xfebad", b"")
    ws.pump.flush()
    assert ws.client.take() == [
        (b"ascii", False),
        ("ünïcode".encode(), False),
        (b"\xff\xfebad", True),
        (b"", False),
    ]


def test_raw_welcome_text_when_configured():
    gw = Gateway(welcome="Welcome {peer} to {name}: {count} online")
    LinePeer(gw.bus)
    ws = gw.connect()
    assert ws.client.take() == [(b"Welcome web-1 to gw: 2 online", False)]


def test_raw_clients_get_no_welcome_by_default_and_no_presence():
    gw = Gateway()
    ws = gw.connect()
    LinePeer(gw.bus)
    ws.pump.flush()
    assert ws.client.messages == []


# JSON clients


def test_json_envelopes_for_text_and_binary():
    gw = Gateway()
    tcp = LinePeer(gw.bus)
    ws = gw.json_client()
    ws.client.take()  # the welcome
    tcp.send(b"hi", b"\xff\x00")
    other = gw.connect()
    other.send(b"\x00\x01", binary=True)
    other.send(b"typed")
    ws.pump.flush()
    assert [e for e in ws.client.events() if e["type"] == "message"] == [
        {
            "type": "message",
            "from": "tcp-1",
            "transport": "tcp",
            "listener": "tcp",
            "channel": "main",
            "text": "hi",
        },
        {
            "type": "message",
            "from": "tcp-1",
            "transport": "tcp",
            "listener": "tcp",
            "channel": "main",
            "base64": base64.b64encode(b"\xff\x00").decode(),
        },
        {
            "type": "message",
            "from": "web-2",
            "transport": "ws",
            "listener": "web",
            "channel": "main",
            "base64": "AAE=",
        },
        {
            "type": "message",
            "from": "web-2",
            "transport": "ws",
            "listener": "web",
            "channel": "main",
            "text": "typed",
        },
    ]
    assert all(not binary for _, binary in ws.client.messages)


def test_json_welcome_lists_count_and_channel_peers():
    gw = Gateway()
    LinePeer(gw.bus)
    gw.connect()
    ws = gw.json_client()
    assert ws.client.websocket_protocol_in_use == JSON_SUBPROTOCOL
    [welcome] = ws.client.events()
    assert welcome == {
        "type": "welcome",
        "peer": "web-2",
        "count": 3,
        "channel": "main",
        "peers": [
            {"peer": "tcp-1", "transport": "tcp"},
            {"peer": "web-1", "transport": "ws"},
            {"peer": "web-2", "transport": "ws"},
        ],
        "channel_count": 3,
    }


def test_json_welcome_ignores_the_text_welcome():
    gw = Gateway(welcome="hello {peer}")
    ws = gw.json_client()
    assert [event["type"] for event in ws.client.events()] == ["welcome"]


def test_json_clients_hear_joins_and_leaves():
    gw = Gateway()
    a, b = gw.json_client(), gw.json_client()
    a.client.take()
    raw = gw.connect()
    tcp = LinePeer(gw.bus, "tcp-9")
    tcp.close("bye")
    raw.client.sendClose(1000)
    raw.pump.flush()
    b.client.sendClose(1000)
    b.pump.flush()
    a.pump.flush()
    assert a.client.events() == [
        {"type": "join", "peer": "web-2", "transport": "ws", "count": 2},
        {"type": "join", "peer": "web-3", "transport": "ws", "count": 3},
        {"type": "join", "peer": "tcp-9", "transport": "tcp", "count": 4},
        {"type": "leave", "peer": "tcp-9", "transport": "tcp", "count": 3},
        {"type": "leave", "peer": "web-3", "transport": "ws", "count": 2},
        {"type": "leave", "peer": "web-2", "transport": "ws", "count": 1},
    ]
    assert raw.client.messages == []


def test_one_presence_watcher_per_listener():
    class CountingBus(Bus):
        watching = 0

        def watch_presence(self, channel, watcher):
            self.watching += 1
            super().watch_presence(channel, watcher)

        def unwatch_presence(self, channel, watcher):
            self.watching -= 1
            super().unwatch_presence(channel, watcher)

    bus = CountingBus()
    clock = Clock()
    gw = Gateway()
    gw.bus = bus
    gw.site = make_site(bus, listener(), Limits(), "gw", clock)
    clients = [gw.json_client() for _ in range(5)]
    assert bus.watching == 1
    for connection in clients:
        connection.client.sendClose(1000)
        connection.pump.flush()
    assert bus.watching == 0


def test_json_clients_send_envelopes_or_raw_frames():
    gw = Gateway()
    tcp = LinePeer(gw.bus)
    ws = gw.json_client()
    ws.send_json({"type": "message", "text": "from envelope"})
    ws.send_json({"type": "message", "base64": "AAH/"})
    ws.send_json({"type": "other", "text": "x"})
    ws.send(b"not json")
    ws.send(b"\x01\x02", binary=True)
    ws.send_json({"type": "message", "base64": "not base64!"})
    assert tcp.payloads() == [
        (b"from envelope", Kind.TEXT),
        (b"\x00\x01\xff", Kind.BINARY),
        (b'{"type": "other", "text": "x"}', Kind.TEXT),
        (b"not json", Kind.TEXT),
        (b"\x01\x02", Kind.BINARY),
        (b'{"type": "message", "base64": "not base64!"}', Kind.TEXT),
    ]


def test_parse_envelope():
    assert parse_envelope(b' {"type":"message","text":"a"}') == (b"a", Kind.TEXT)
    assert parse_envelope(b'{"type":"message","text":"\\ud800"}') is None
    assert parse_envelope(b"[1]") is None
    assert parse_envelope(b"{" * 100000) is None
    assert parse_envelope(b'{"type":"message"}') is None


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_json_framer_round_trips_any_bytes(payloads):
    batch = Batch(Origin("udp-1", "udp", "udp"), "main", payloads)
    wire = JSON_FRAMER.frame(batch)
    decoded = []
    while wire:
        assert wire[0] == 0x81
        length = wire[1]
        start = 2
        if length == 126:
            length, start = int.from_bytes(wire[2:4], "big"), 4
        decoded.append(json.loads(wire[start : start + length]))
        wire = wire[start + length :]
    for envelope, payload in zip(decoded, payloads, strict=True):
        if "text" in envelope:
            assert envelope["text"].encode() == payload
        else:
            assert base64.b64decode(envelope["base64"]) == payload
            assert Kind.of(payload) is Kind.BINARY


def test_raw_framer_batches_without_kinds():
    batch = Batch(Origin("tcp-1", "tcp", "tcp"), "main", [b"a", b"\xff"], None, b"a\n\xff\n")
    assert RAW_FRAMER.frame(batch) == b"\x81\x01a\x82\x01\xff"


# Limits and close codes


def test_oversize_message_is_refused_with_1009():
    gw = Gateway(Limits(max_message_bytes=100))
    tcp = LinePeer(gw.bus)
    ws = gw.connect()
    ws.send(b"x" * 100)
    ws.send(b"x" * 101)
    assert tcp.payloads() == [(b"x" * 100, Kind.TEXT)]
    assert ws.client.closed is not None
    assert ws.client.remoteCloseCode == 1009
    assert gw.bus.peer_count == 1
    assert gw.bus.metrics.disconnects["oversize"] == 1


def test_invalid_utf8_text_is_refused_with_1007():
    gw = Gateway()
    tcp = LinePeer(gw.bus)
    ws = gw.connect()
    ws.send(b"\xff\xfe not utf-8")
    assert tcp.received == []
    assert ws.client.remoteCloseCode == 1007
    assert gw.bus.metrics.disconnects["invalid_utf8"] == 1


def test_close_sends_1001_and_the_reason():
    gw = Gateway()
    ws = gw.connect()
    ws.peer.close("gateway shutting down")
    ws.pump.flush()
    assert ws.client.remoteCloseCode == 1001
    assert ws.client.remoteCloseReason == "gateway shutting down"
    assert gw.bus.peer_count == 0
    assert gw.site.connections == set()
    assert gw.clock.getDelayedCalls() == []


def test_close_with_normal_code():
    gw = Gateway()
    ws = gw.connect()
    ws.peer.close("done", code=1000)
    ws.pump.flush()
    assert (ws.client.remoteCloseCode, ws.client.remoteCloseReason) == (1000, "done")


def test_slow_consumer_is_closed_with_1008_and_dropped():
    gw = Gateway(Limits(max_pending_bytes=2048))
    tcp = LinePeer(gw.bus)
    ws = gw.connect()
    backlog = ws.peer.backlog
    assert backlog is not None
    backlog.pauseProducing()
    assert ws.server_io.producer is ws.peer.backlog
    for _ in range(30):
        tcp.send(b"y" * 100)
    assert gw.bus.peer_count == 1
    assert gw.bus.metrics.disconnects["slow_consumer"] == 1
    assert ws.server_io.disconnecting
    ws.pump.flush()
    assert ws.client.remoteCloseCode == 1008


def test_resumed_consumer_is_not_counted():
    gw = Gateway(Limits(max_pending_bytes=2048))
    tcp = LinePeer(gw.bus)
    ws = gw.connect()
    backlog = ws.peer.backlog
    assert backlog is not None
    for _ in range(5):
        backlog.pauseProducing()
        for _ in range(15):
            tcp.send(b"y" * 100)
        backlog.resumeProducing()
    ws.pump.flush()
    assert len(ws.client.messages) == 75
    assert gw.bus.peer_count == 2


def test_a_peer_closing_during_fan_out_never_reaches_the_sender():
    gw = Gateway()
    sender, closing, broken, fine = (gw.connect() for _ in range(4))
    closing.peer.close("going")

    def explode(data: bytes) -> None:
        raise RuntimeError("transport gone")

    broken.peer.transport.write = explode  # type: ignore[union-attr, method-assign]
    sender.send(b"still works")
    fine.pump.flush()
    assert fine.client.take() == [(b"still works", False)]
    assert closing.client.messages == []
    assert sender.client.closed is None
    assert sender.peer.state == sender.peer.STATE_OPEN
    sender.send(b"again")
    fine.pump.flush()
    assert fine.client.take() == [(b"again", False)]


def test_auto_ping_drops_a_peer_that_misses_pongs():
    gw = Gateway(ping_interval=5.0)
    ws = gw.connect()
    for _ in range(3):
        gw.clock.advance(5)
        ws.pump.flush()  # the client answers the ping
    assert ws.client.closed is None
    gw.clock.advance(5)  # a ping the client never sees
    gw.clock.advance(5)
    assert ws.server_io.disconnecting
    ws.pump.flush()
    assert ws.client.closed is not None
    assert gw.bus.peer_count == 0


# Origins


@pytest.mark.parametrize(
    ("allowed", "origin", "host", "status"),
    [
        (None, None, "localhost:9000", 101),
        (None, "http://localhost:9000", "localhost:9000", 101),
        (None, "http://LOCALHOST:9000", "localhost:9000", 101),
        (None, "https://example.com", "example.com", 101),
        (None, "http://example.com", "example.com", 101),
        (None, "https://example.com:443", "example.com", 101),
        (None, "http://example.com:8080", "example.com", 403),
        (None, "http://localhost:9001", "localhost:9000", 403),
        (None, "http://evil.example", "localhost:9000", 403),
        (None, "null", "localhost:9000", 403),
        (None, "http://[::1]:9000", "[::1]:9000", 101),
        (("*",), "http://evil.example", "localhost:9000", 101),
        (("*",), "null", "localhost:9000", 101),
        (("https://app.example",), "https://app.example", "localhost:9000", 101),
        (("https://app.example",), "https://app.example:443", "localhost:9000", 101),
        (("https://app.example",), "http://app.example", "localhost:9000", 403),
        (("https://app.example",), "http://localhost:9000", "localhost:9000", 403),
        (("https://app.example",), None, "localhost:9000", 101),
    ],
)
def test_origin_policy_in_the_handshake(allowed, origin, host, status):
    gw = Gateway(allowed_origins=allowed)
    transport = gw.http(upgrade_request(origin, host))
    assert status_of(transport) == status
    assert gw.bus.peer_count == (1 if status == 101 else 0)
    if status == 403:
        assert transport.disconnecting


def test_origin_policy_unit():
    same = OriginPolicy(None)
    assert same.allows(None, None)
    assert same.allows("https://a.example:8443", "A.example:8443")
    assert not same.allows("https://a.example:8443", None)
    assert not same.allows("https://a.example", "a.example:notaport")


def test_subprotocol_offered_but_other_is_raw():
    gw = Gateway()
    reply = gw.http(upgrade_request(protocols="chat, something"))
    assert status_of(reply) == 101
    assert b"sec-websocket-protocol" not in reply.value().lower()
    reply = gw.http(upgrade_request(protocols=f"chat, {JSON_SUBPROTOCOL}"))
    assert f"Sec-WebSocket-Protocol: {JSON_SUBPROTOCOL}".encode() in reply.value()


def test_no_extensions_are_accepted():
    gw = Gateway()
    request = upgrade_request().replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    reply = gw.http(request)
    assert status_of(reply) == 101
    assert b"extensions" not in reply.value().lower()


def test_upgrade_after_a_page_on_the_same_connection():
    gw = Gateway()
    transport = gw.http(b"GET / HTTP/1.1\r\nHost: localhost:9000\r\n\r\n")
    transport.clear()
    transport.protocol.dataReceived(upgrade_request())  # type: ignore[attr-defined]
    assert status_of(transport) == 101
    assert gw.bus.peer_count == 1
    gw.clock.advance(60)
    assert not transport.disconnecting


def test_peer_and_framers_provide_their_interfaces():
    gw = Gateway()
    ws = gw.connect()
    assert verifyObject(IPeer, ws.peer)
    assert verifyObject(IPushProducer, ws.peer.backlog)
    assert verifyObject(IFramer, RAW_FRAMER)
    assert verifyObject(IFramer, JSON_FRAMER)


def test_upgrade_hands_the_producer_slot_to_the_peer():
    gw = Gateway()
    transport = gw.http(upgrade_request())
    assert isinstance(transport.producer, Backlog)


# The page


def test_get_root_returns_the_client_page():
    gw = Gateway()
    reply = gw.http(b"GET / HTTP/1.1\r\nHost: localhost:9000\r\n\r\n")
    head, _, body = reply.value().partition(b"\r\n\r\n")
    assert status_of(reply) == 200
    assert b"content-type: text/html; charset=utf-8" in head.lower()
    for element in (b"status", b"count", b"log", b"message", b"send", b"online"):
        assert b'id="' + element + b'"' in body
    assert b'aria-live="polite"' in body


@pytest.mark.parametrize(
    ("path", "content_type"),
    [(b"/app.js", b"text/javascript"), (b"/style.css", b"text/css")],
)
def test_page_assets(path, content_type):
    gw = Gateway()
    reply = gw.http(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status_of(reply) == 200
    assert b"content-type: " + content_type in reply.value().lower()


def test_app_uses_the_subprotocol_and_the_ws_path():
    gw = Gateway()
    body = gw.http(b"GET /app.js HTTP/1.1\r\nHost: localhost\r\n\r\n").value()
    assert JSON_SUBPROTOCOL.encode() in body
    assert b'new URL("ws", location.href)' in body


def test_unknown_paths_are_404_and_plain_get_on_ws_is_426():
    gw = Gateway()
    assert status_of(gw.http(b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n")) == 404
    assert status_of(gw.http(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")) == 426


# The handshake deadline


def test_silent_connection_is_dropped_at_the_deadline():
    gw = Gateway(Limits(handshake_timeout=5.0))
    transport = gw.http(b"")
    gw.clock.advance(4.9)
    assert not transport.disconnecting
    gw.clock.advance(0.2)
    assert transport.disconnected


def test_half_a_request_is_dropped_at_the_deadline():
    gw = Gateway(Limits(handshake_timeout=5.0))
    transport = gw.http(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
    for _ in range(9):
        gw.clock.advance(0.5)
    assert not transport.disconnecting
    gw.clock.advance(0.6)
    assert transport.disconnected


def test_open_websocket_outlives_the_deadline():
    gw = Gateway(Limits(handshake_timeout=5.0))
    ws = gw.connect()
    gw.clock.advance(60)
    ws.pump.flush()
    assert ws.client.closed is None
    assert gw.clock.getDelayedCalls() == []
    ws.send(b"still here")


def test_idle_keep_alive_after_a_page_is_dropped():
    gw = Gateway(Limits(handshake_timeout=5.0))
    transport = gw.http(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status_of(transport) == 200
    gw.clock.advance(4)
    assert not transport.disconnecting
    gw.clock.advance(2)
    assert transport.disconnecting


def test_connections_are_tracked_for_shutdown():
    gw = Gateway()
    page = gw.http(b"")
    ws = gw.connect()
    assert len(gw.site.connections) == 2
    for connection in list(gw.site.connections):
        connection.abort("gateway shutting down")
    ws.pump.flush()
    assert page.disconnected
    assert ws.client.closed is not None
    assert gw.bus.peer_count == 0
