"""The WebSocket listener in memory: frames, JSON envelopes, presence, origins, limits.

Each test runs the real gateway (``gateway.testing.MemoryGateway``) from a
TOML string: WebSocket clients are Autobahn's own client protocol over
``iosim``, line peers are real ``tcp`` connections (or, where a test needs
typed payloads, a fake peer on the bus), plain HTTP is driven through a
``StringTransport``. Time is the gateway's memory clock.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.core.bus import Bus
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin
from gateway.flow.backlog import Backlog
from gateway.testing import MemoryGateway, StreamConnection, WebSocketClient
from gateway.transports.envelopes import RequestError, parse_request
from gateway.transports.runtime import ListenerRuntime
from gateway.transports.websocket.envelope import JSON_FRAMER, JSON_SUBPROTOCOL
from gateway.transports.websocket.frames import (
    RAW_FRAMER,
    count_frames,
    frame_header,
    frame_message,
)
from gateway.transports.websocket.origins import OriginPolicy
from gateway.transports.websocket.peer import WebSocketPeer

WEB = "web"
"""The WebSocket listener of every test (port 9000: clients send ``Host: localhost:9000``)."""
LINE = "tcp"
"""A tcp listener next to it, for real line peers (``tcp-1``, ``tcp-2``...)."""


def toml_value(value: object) -> str:
    """``value`` as TOML (strings, numbers, booleans, lists of strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(header: str, values: dict[str, object]) -> str:
    lines = [header]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def gateway_toml(limits: dict[str, object] | None = None, **listener: object) -> str:
    """A gateway "gw" with one ``ws`` listener (``listener`` overrides its keys) and a tcp one."""
    web: dict[str, object] = {"name": WEB, "type": "ws", "port": 9000, "ping_interval": 0}
    web.update(listener)
    return "\n".join(
        [
            toml_table("[gateway]", {"name": "gw"}),
            toml_table("[limits]", {"handshake_timeout": 5, **(limits or {})}),
            toml_table("[[listeners]]", web),
            toml_table("[[listeners]]", {"name": LINE, "type": "tcp", "port": 8006}),
        ]
    )


_running: list[MemoryGateway] = []


@pytest.fixture(autouse=True)
def _stop_gateways() -> Iterator[None]:
    """Every gateway a test built is stopped (drained) at its end."""
    yield
    while _running:
        _running.pop().stop()


@implementer(IFramer)
class BatchFramer:
    """Hands receivers the batch itself, so tests can look at it."""

    name = "test"

    def frame(self, batch: Batch) -> Batch:
        return batch

    def count(self, wire: Batch) -> int:
        return len(wire.payloads)


BATCH_FRAMER = BatchFramer()


@implementer(IPeer)
class LinePeer:
    """A stand-in for a tcp/udp peer on the bus: sends typed or untyped payloads, records
    the batches it gets (a real tcp peer can send neither binary kinds nor empty lines)."""

    subject = None
    pending_bytes = 0
    dropped_messages = 0
    permissions = None

    def forbidden(self, action: str, channel: str) -> None:
        raise AssertionError(f"refused {action} {channel}")

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


class Connection:
    """A WebSocket client connected to the ``web`` listener, and the gateway's peer."""

    def __init__(self, gateway: MemoryGateway, stream: StreamConnection) -> None:
        self.gateway = gateway
        self.stream = stream
        self.server_io = stream.server_io

    @property
    def client(self) -> WebSocketClient:
        client = self.stream.client
        assert isinstance(client, WebSocketClient)
        return client

    @property
    def peer(self) -> WebSocketPeer:
        peer = self.stream.peer
        assert isinstance(peer, WebSocketPeer)
        return peer

    @property
    def backlog(self) -> Backlog:
        flow = self.peer.flow
        assert flow is not None
        return flow.backlog

    def send(self, payload: bytes, binary: bool = False) -> None:
        self.client.sendMessage(payload, isBinary=binary)
        self.gateway.flush()

    def send_json(self, value: object) -> None:
        self.send(json.dumps(value).encode())


class Gateway(MemoryGateway):
    """The real gateway in memory: a ``ws`` listener "web" (``listener`` overrides its
    keys, ``limits`` the ``[limits]``, handshake_timeout 5 by default) and a ``tcp`` one."""

    def __init__(
        self, limits: dict[str, object] | None = None, base: Path | None = None, **listener: object
    ) -> None:
        self.web = str(listener.get("name", WEB))
        super().__init__(gateway_toml(limits, **listener), base=base)
        _running.append(self)

    @property
    def runtime(self) -> ListenerRuntime:
        """The ``web`` listener's runtime (its open connections)."""
        return self.listener(self.web).runtime

    def ws(self, protocols: list[str] | None = None, origin: str | None = None) -> Connection:
        return Connection(self, self.websocket_connection(self.web, "/ws", protocols, origin))

    def json_ws(self) -> Connection:
        return self.ws(protocols=[JSON_SUBPROTOCOL])

    def line(self) -> StreamConnection:
        """A real line peer on the tcp listener."""
        return self.connect(LINE)

    def page(self, request: bytes) -> StringTransport:
        """Raw HTTP bytes on a new connection of ``web``; the transport holds the reply."""
        return self.http(self.web, request)


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
EDGES = [124, 125, 126, 127, 65534, 65535, 65536, 65537]
"""Frame lengths on both sides of the 7-bit, 16-bit and 64-bit length encodings."""


def frame_lengths(wire: bytes) -> list[int]:
    """The payload lengths of the server frames in ``wire``, read independently of the gateway."""
    lengths = []
    while wire:
        assert wire[0] & 0x80  # FIN: never fragmented
        length, start = wire[1], 2
        assert not length & 0x80  # server frames are never masked
        if length == 126:
            length, start = int.from_bytes(wire[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(wire[2:10], "big"), 10
        lengths.append(length)
        wire = wire[start + length :]
    return lengths


def test_count_frames_of_64_messages_from_both_framers():
    origin = Origin("tcp-1", "tcp", "tcp")
    sizes = [EDGES[n % len(EDGES)] for n in range(64)]
    payloads = [bytes([65 + n % 26]) * size for n, size in enumerate(sizes)]
    kinds = [Kind.BINARY if n % 2 else Kind.TEXT for n in range(64)]
    raw = RAW_FRAMER.frame(Batch(origin, "main", payloads, kinds))
    assert frame_lengths(raw) == sizes
    assert count_frames(raw) == RAW_FRAMER.count(raw) == 64
    # JSON envelopes of exactly those lengths: the payload is what the envelope adds less.
    envelope = len(JSON_FRAMER.frame(Batch(origin, "main", [b""], [Kind.TEXT]))) - 2
    texts = [b"x" * (size - envelope) for size in sizes]
    wire = JSON_FRAMER.frame(Batch(origin, "main", texts, [Kind.TEXT] * 64))
    assert frame_lengths(wire) == sizes
    assert count_frames(wire) == JSON_FRAMER.count(wire) == 64
    assert count_frames(b"") == 0


def test_every_way_of_framing_a_batch_makes_the_same_frames():
    """A TCP read's lines (no kinds: ASCII, so all text), kinds given, kinds worked out:
    each message is ``frame_message`` of it, whatever its length."""
    origin = Origin("tcp-1", "tcp", "tcp")
    sizes = [0, 1, *EDGES[:4], 200, *EDGES[4:]]
    payloads = [bytes([65 + n % 26]) * size for n, size in enumerate(sizes)]
    text = b"".join(frame_message(payload, 0x1) for payload in payloads)
    lines = b"".join(payload + b"\n" for payload in payloads)
    assert RAW_FRAMER.frame(Batch(origin, "main", payloads, None, lines)) == text
    assert RAW_FRAMER.frame(Batch(origin, "main", payloads, [Kind.TEXT] * len(sizes))) == text
    assert RAW_FRAMER.frame(Batch(origin, "main", payloads)) == text
    mixed = [Kind.BINARY if n % 2 else Kind.TEXT for n in range(len(sizes))]
    expected = b"".join(
        frame_message(payload, 0x2 if kind is Kind.BINARY else 0x1)
        for payload, kind in zip(payloads, mixed, strict=True)
    )
    assert RAW_FRAMER.frame(Batch(origin, "main", payloads, mixed)) == expected
    one = [b"\xff short binary"]
    assert RAW_FRAMER.frame(Batch(origin, "main", one)) == frame_message(one[0], 0x2)


def test_autobahn_decodes_our_frames_text_and_binary():
    gw = Gateway()
    ws = gw.ws()
    tcp = LinePeer(gw.bus)
    payloads = [bytes([65 + n % 26]) * n for n in LENGTHS]
    binaries = [bytes([n % 256 for n in range(length)]) for length in LENGTHS]
    tcp.send(
        *payloads, *binaries, kinds=[Kind.TEXT] * len(payloads) + [Kind.BINARY] * len(binaries)
    )
    gw.flush()
    assert ws.client.messages == [(p, False) for p in payloads] + [(b, True) for b in binaries]
    assert ws.client.closed is None


def test_each_receiver_gets_one_write_per_batch():
    gw = Gateway()
    receivers = [gw.ws() for _ in range(3)]
    writes: list[list[bytes]] = []
    for connection in receivers:
        log: list[bytes] = []
        writes.append(log)
        connection.peer.transport.write = log.append
    gw.line().send(b"one\ntwo\nthree\n")  # one read, one batch
    assert [len(log) for log in writes] == [1, 1, 1]
    assert writes[0][0] == writes[1][0] == writes[2][0]
    assert writes[0][0] == b"\x81\x03one\x81\x03two\x81\x05three"


# Raw clients


def test_websocket_to_websocket_keeps_the_opcode():
    gw = Gateway()
    a, b = gw.ws(), gw.ws()
    a.send("héllo".encode())
    a.send(b"\x00\x01\xff", binary=True)
    a.send(b"plain text that is ascii", binary=True)
    assert b.client.take() == [
        ("héllo".encode(), False),
        (b"\x00\x01\xff", True),
        (b"plain text that is ascii", True),
    ]
    assert a.client.messages == []  # no echo by default


def test_echo_sends_own_messages_back():
    gw = Gateway(echo=True)
    a = gw.ws()
    a.send(b"me")
    assert a.client.take() == [(b"me", False)]


def test_websocket_messages_reach_line_peers_with_their_kind_and_origin(tmp_path):
    gw = Gateway(
        base=tmp_path,
        type="wss",
        name="secure",
        cert="certs/server.pem",
        key="certs/server.key",
        generate_dev_cert=True,
    )
    tcp = LinePeer(gw.bus)
    ws = gw.ws()
    assert ws.client.opened
    ws.send(b"text")
    ws.send(b"\xff\x00", binary=True)
    ws.send(b"", binary=False)
    assert tcp.payloads() == [(b"text", Kind.TEXT), (b"\xff\x00", Kind.BINARY), (b"", Kind.TEXT)]
    origin = tcp.received[0].origin
    assert (origin.peer_id, origin.listener, origin.transport) == ("secure-1", "secure", "wss")
    assert ws.peer.origin is origin


def test_line_transport_bytes_are_text_when_utf8_else_binary():
    gw = Gateway()
    ws = gw.ws()
    tcp = LinePeer(gw.bus)
    tcp.send(b"ascii", "ünïcode".encode(), b"\xff\xfebad", b"")
    gw.flush()
    assert ws.client.take() == [
        (b"ascii", False),
        ("ünïcode".encode(), False),
        (b"\xff\xfebad", True),
        (b"", False),
    ]


def test_lines_of_a_real_tcp_peer_are_text_when_utf8_else_binary():
    gw = Gateway()
    ws = gw.ws()
    gw.line().send(b"ascii\n" + "ünïcode".encode() + b"\n\xff\xfebad\n")
    assert ws.client.take() == [
        (b"ascii", False),
        ("ünïcode".encode(), False),
        (b"\xff\xfebad", True),
    ]


def test_raw_welcome_text_when_configured():
    gw = Gateway(welcome="Welcome {peer} to {name}: {count} online")
    gw.line()
    ws = gw.ws()
    assert ws.client.take() == [(b"Welcome web-1 to gw: 2 online", False)]


def test_raw_clients_get_no_welcome_by_default_and_no_presence():
    gw = Gateway()
    ws = gw.ws()
    gw.line()
    gw.flush()
    assert ws.client.messages == []


# JSON clients


def test_json_envelopes_for_text_and_binary():
    gw = Gateway()
    tcp = gw.line()
    ws = gw.json_ws()
    ws.client.take()  # the welcome
    tcp.send(b"hi\n\xff\x00\n")
    other = gw.ws()
    other.send(b"\x00\x01", binary=True)
    other.send(b"typed")
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
    gw.line()
    gw.ws()
    ws = gw.json_ws()
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
    ws = gw.json_ws()
    assert [event["type"] for event in ws.client.events()] == ["welcome"]


def test_json_clients_hear_joins_and_leaves():
    gw = Gateway()
    a = gw.json_ws()
    a.client.take()  # the welcome
    b = gw.json_ws()
    raw = gw.ws()
    tcp = gw.line()
    tcp.close()
    raw.client.sendClose(1000)
    gw.flush()
    b.client.sendClose(1000)
    gw.flush()
    assert a.client.events() == [
        {"type": "join", "peer": "web-2", "transport": "ws", "channel": "main", "count": 2},
        {"type": "join", "peer": "web-3", "transport": "ws", "channel": "main", "count": 3},
        {"type": "join", "peer": "tcp-1", "transport": "tcp", "channel": "main", "count": 4},
        {"type": "leave", "peer": "tcp-1", "transport": "tcp", "channel": "main", "count": 3},
        {"type": "leave", "peer": "web-3", "transport": "ws", "channel": "main", "count": 2},
        {"type": "leave", "peer": "web-2", "transport": "ws", "channel": "main", "count": 1},
    ]
    assert raw.client.messages == []


def test_one_presence_watcher_per_listener(monkeypatch):
    gw = Gateway()
    bus = gw.bus
    watching = 0
    watch, unwatch = bus.watch_presence, bus.unwatch_presence

    def counting_watch(channel, watcher):
        nonlocal watching
        watching += 1
        watch(channel, watcher)

    def counting_unwatch(channel, watcher):
        nonlocal watching
        watching -= 1
        unwatch(channel, watcher)

    monkeypatch.setattr(bus, "watch_presence", counting_watch)
    monkeypatch.setattr(bus, "unwatch_presence", counting_unwatch)
    clients = [gw.json_ws() for _ in range(5)]
    assert watching == 1
    for connection in clients:
        connection.client.sendClose(1000)
        gw.flush()
    assert watching == 0


def test_json_clients_send_envelopes_or_raw_frames():
    gw = Gateway()
    tcp = LinePeer(gw.bus)
    ws = gw.json_ws()
    ws.send_json({"type": "message", "text": "from envelope"})
    ws.send_json({"type": "message", "base64": "AAH/"})
    ws.send_json({"type": "other", "text": "x"})
    ws.send(b"not json")
    ws.send(b"\x01\x02", binary=True)
    ws.send_json({"type": "message", "base64": "not base64!", "id": "q1"})
    assert ws.client.events()[-1] == {
        "type": "error",
        "code": "bad_request",
        "reason": '"base64" is not valid base64',
        "id": "q1",
    }  # an invalid request is answered, not relayed
    assert tcp.payloads() == [
        (b"from envelope", Kind.TEXT),
        (b"\x00\x01\xff", Kind.BINARY),
        (b'{"type": "other", "text": "x"}', Kind.TEXT),
        (b"not json", Kind.TEXT),
        (b"\x01\x02", Kind.BINARY),
    ]


def test_parse_request():
    request = parse_request(b' {"type":"message","text":"a"}')
    assert request is not None
    assert (request.payload, request.kind, request.channel) == (b"a", Kind.TEXT, None)
    binary = parse_request(b'{"type":"message","base64":"AP8=","channel":"room.1","id":7}')
    assert binary is not None
    assert (binary.payload, binary.kind, binary.channel) == (b"\x00\xff", Kind.BINARY, "room.1")
    assert binary.answer(type="x") == {"type": "x", "id": 7}
    # Not requests: relayed as the text they are.
    assert parse_request(b"[1]") is None
    assert parse_request(b"{" * 100000) is None
    assert parse_request(b'{"type":"chat","text":"a"}') is None
    # Requests of a known type that are invalid: an error event, with the code.
    for data, code in [
        (b'{"type":"message","text":"\\ud800"}', "bad_request"),
        (b'{"type":"message"}', "bad_request"),
        (b'{"type":"message","base64":"***"}', "bad_request"),
        (b'{"type":"message","text":"a","channel":"room.*"}', "bad_channel"),
        (b'{"type":"subscribe"}', "bad_channel"),
        (b'{"type":"subscribe","channel":5}', "bad_channel"),
        (b'{"type":"unsubscribe","channel":"a","id":[1]}', "bad_request"),
    ]:
        with pytest.raises(RequestError) as error:
            parse_request(data)
        assert error.value.event["code"] == code, data


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
    gw = Gateway({"max_message_bytes": 100})
    tcp = LinePeer(gw.bus)
    ws = gw.ws()
    ws.send(b"x" * 100)
    ws.send(b"x" * 101)
    assert tcp.payloads() == [(b"x" * 100, Kind.TEXT)]
    assert ws.client.closed is not None
    assert ws.client.remoteCloseCode == 1009
    assert gw.bus.peer_count == 1
    assert gw.bus.metrics.disconnects["oversize"] == 1


def test_invalid_utf8_text_is_refused_with_1007():
    gw = Gateway()
    tcp = gw.line()
    ws = gw.ws()
    ws.send(b"\xff\xfe not utf-8")
    assert tcp.received() == b""
    assert ws.client.remoteCloseCode == 1007
    assert gw.bus.metrics.disconnects["invalid_utf8"] == 1


def test_close_sends_1001_and_the_reason():
    gw = Gateway()
    ws = gw.ws()
    ws.peer.close("gateway shutting down")
    gw.flush()
    assert ws.client.remoteCloseCode == 1001
    assert ws.client.remoteCloseReason == "gateway shutting down"
    assert gw.bus.peer_count == 0
    assert gw.runtime.connections == set()
    assert gw.reactor.getDelayedCalls() == []


def test_close_with_normal_code():
    gw = Gateway()
    ws = gw.ws()
    ws.peer.close("done", code=1000)
    gw.flush()
    assert (ws.client.remoteCloseCode, ws.client.remoteCloseReason) == (1000, "done")


def test_slow_consumer_is_closed_with_1008_and_dropped():
    gw = Gateway({"max_pending_bytes": 2048})
    tcp = gw.line()
    ws = gw.ws()
    ws.stream.stall()  # the transport is full: it paused its producer, the peer's backlog
    assert ws.server_io.producer is ws.backlog
    assert ws.backlog.paused
    written_frames: list[bytes] = []
    write = ws.server_io.write

    def record(data: bytes) -> None:
        written_frames.append(data)
        write(data)

    ws.server_io.write = record  # type: ignore[method-assign]
    for _ in range(30):
        tcp.send(b"y" * 100 + b"\n")
    assert gw.bus.peer_count == 1
    assert gw.bus.metrics.disconnects["slow_consumer"] == 1
    # The close frame went out, then the connection was cut (an abort discards
    # what the full transport still held, as a real socket does).
    assert ws.server_io.aborted
    assert b"\x88" in written_frames[-1][:1] and b"slow consumer" in written_frames[-1]
    gw.flush()
    assert ws.client.closed is not None and not ws.client.closed[0]


def test_resumed_consumer_is_not_counted():
    gw = Gateway({"max_pending_bytes": 2048})
    tcp = gw.line()
    ws = gw.ws()
    for _ in range(5):
        ws.stream.stall()
        for _ in range(15):
            tcp.send(b"y" * 100 + b"\n")
        ws.stream.unstall()
    gw.flush()
    assert len(ws.client.messages) == 75
    assert gw.bus.peer_count == 2
    assert gw.bus.metrics.disconnects["slow_consumer"] == 0


def test_a_peer_closing_during_fan_out_never_reaches_the_sender():
    gw = Gateway()
    sender, closing, broken, fine = (gw.ws() for _ in range(4))
    closing.peer.close("going")

    def explode(data: bytes) -> None:
        raise RuntimeError("transport gone")

    broken.peer.transport.write = explode
    sender.send(b"still works")
    assert fine.client.take() == [(b"still works", False)]
    assert closing.client.messages == []
    assert sender.client.closed is None
    assert sender.peer.state == sender.peer.STATE_OPEN
    sender.send(b"again")
    assert fine.client.take() == [(b"again", False)]


def test_auto_ping_drops_a_peer_that_misses_pongs():
    gw = Gateway(ping_interval=5.0)
    ws = gw.ws()
    gw.advance(15)  # three pings, each answered
    assert ws.client.closed is None
    gw.reactor.advance(5)  # a ping the client never sees (no bytes move)
    gw.reactor.advance(5)
    assert ws.server_io.disconnecting
    gw.flush()
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
    assert gw.listener(WEB).config.allowed_origins == allowed  # type: ignore[attr-defined]
    transport = gw.page(upgrade_request(origin, host))
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
    reply = gw.page(upgrade_request(protocols="chat, something"))
    assert status_of(reply) == 101
    assert b"sec-websocket-protocol" not in reply.value().lower()
    reply = gw.page(upgrade_request(protocols=f"chat, {JSON_SUBPROTOCOL}"))
    assert f"Sec-WebSocket-Protocol: {JSON_SUBPROTOCOL}".encode() in reply.value()


def test_no_extensions_are_accepted():
    gw = Gateway()
    request = upgrade_request().replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    reply = gw.page(request)
    assert status_of(reply) == 101
    assert b"extensions" not in reply.value().lower()


def test_upgrade_after_a_page_on_the_same_connection():
    gw = Gateway()
    transport = gw.page(b"GET / HTTP/1.1\r\nHost: localhost:9000\r\n\r\n")
    transport.clear()
    transport.protocol.dataReceived(upgrade_request())  # type: ignore[attr-defined]
    assert status_of(transport) == 101
    assert gw.bus.peer_count == 1
    gw.advance(60)
    assert not transport.disconnecting


def test_peer_and_framers_provide_their_interfaces():
    gw = Gateway()
    ws = gw.ws()
    assert verifyObject(IPeer, ws.peer)
    assert verifyObject(IPeer, gw.line().peer)
    assert verifyObject(IPushProducer, ws.backlog)
    assert verifyObject(IFramer, RAW_FRAMER)
    assert verifyObject(IFramer, JSON_FRAMER)
    # The fakes of these tests too.
    assert verifyObject(IPeer, LinePeer(gw.bus))
    assert verifyObject(IFramer, BATCH_FRAMER)


def test_upgrade_hands_the_producer_slot_to_the_peer():
    gw = Gateway()
    transport = gw.page(upgrade_request())
    assert isinstance(transport.producer, Backlog)
    [peer] = gw.peers()
    assert isinstance(peer, WebSocketPeer)
    assert peer.flow is not None
    assert transport.producer is peer.flow.backlog


# The page


def test_get_root_returns_the_client_page():
    gw = Gateway()
    reply = gw.page(b"GET / HTTP/1.1\r\nHost: localhost:9000\r\n\r\n")
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
    reply = gw.page(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status_of(reply) == 200
    assert b"content-type: " + content_type in reply.value().lower()


def test_app_uses_the_subprotocol_and_the_ws_path():
    gw = Gateway()
    body = gw.page(b"GET /app.js HTTP/1.1\r\nHost: localhost\r\n\r\n").value()
    assert JSON_SUBPROTOCOL.encode() in body
    assert b'new URL("ws", location.href)' in body


def test_unknown_paths_are_404_and_plain_get_on_ws_is_426():
    gw = Gateway()
    assert status_of(gw.page(b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n")) == 404
    assert status_of(gw.page(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")) == 426


# The handshake deadline


def test_silent_connection_is_dropped_at_the_deadline():
    gw = Gateway({"handshake_timeout": 5.0})
    transport = gw.page(b"")
    gw.advance(4.9)
    assert not transport.disconnecting
    gw.advance(0.2)
    assert transport.disconnected


def test_half_a_request_is_dropped_at_the_deadline():
    gw = Gateway({"handshake_timeout": 5.0})
    transport = gw.page(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
    for _ in range(9):
        gw.advance(0.5)
    assert not transport.disconnecting
    gw.advance(0.6)
    assert transport.disconnected


def test_open_websocket_outlives_the_deadline():
    gw = Gateway({"handshake_timeout": 5.0})
    ws = gw.ws()
    gw.advance(60)
    assert ws.client.closed is None
    assert gw.reactor.getDelayedCalls() == []
    tcp = gw.line()
    ws.send(b"still here")
    assert tcp.lines() == [b"still here"]


def test_idle_keep_alive_after_a_page_is_dropped():
    gw = Gateway({"handshake_timeout": 5.0})
    transport = gw.page(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status_of(transport) == 200
    gw.advance(4)
    assert not transport.disconnecting
    gw.advance(2)
    assert transport.disconnecting


def test_connections_are_tracked_for_shutdown():
    gw = Gateway()
    page = gw.page(b"")
    ws = gw.ws()
    assert len(gw.runtime.connections) == 2
    for connection in list(gw.runtime.connections):
        connection.abort("gateway shutting down")
    gw.flush()
    assert page.disconnected
    assert ws.client.closed is not None
    assert gw.bus.peer_count == 0
