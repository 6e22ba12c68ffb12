"""One peer lifecycle for every transport: the defects the old per-transport copies had.

Each test here failed before the transport layer was written once (see the
one-transport-layer issue): reload and connection caps missed WebSocket
listeners, a closing WebSocket ignored the drain, WebSocket drops were counted
per batch, and the bus read attributes no interface declared.
"""

from __future__ import annotations

import json

from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.core.bus import Bus
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Origin
from gateway.testing import MemoryGateway

WS_ONLY = """
[limits]
handshake_timeout = 5

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
allowed_origins = ["https://a.example"]
"""


def upgrade(origin: str) -> bytes:
    return (
        "GET /ws HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    ).encode()


def status(reply: bytes) -> int:
    return int(reply.split(b"\r\n", 1)[0].split()[1])


# A reload reaches WebSocket listeners


def test_reload_changes_the_allowed_origins_of_a_ws_listener():
    gw = MemoryGateway(WS_ONLY)
    assert status(gw.http("ws", upgrade("https://b.example")).value()) == 403
    gw.reload(WS_ONLY.replace("https://a.example", "https://b.example"))
    assert status(gw.http("ws", upgrade("https://b.example")).value()) == 101
    assert status(gw.http("ws", upgrade("https://a.example")).value()) == 403
    gw.stop()


def test_reload_changes_the_message_limit_and_ping_interval_of_a_ws_listener():
    gw = MemoryGateway(WS_ONLY.replace("allowed_origins", "# allowed_origins"))
    before = gw.websocket("ws")
    gw.reload(
        WS_ONLY.replace("allowed_origins", "# allowed_origins")
        .replace("handshake_timeout = 5", "handshake_timeout = 5\nmax_message_bytes = 10")
        .replace("ping_interval = 0", "ping_interval = 2")
    )
    after = gw.websocket("ws")
    after.sendMessage(b"x" * 11)
    gw.flush()
    assert after.closed is not None and after.closed[1] == 1009
    # Pings every 2 s for connections made since; the earlier one keeps its settings.
    pinged = gw.websocket("ws")
    gw.advance(7)
    assert pinged.pings >= 3 and pinged.closed is None
    assert before.pings == 0 and before.closed is None
    gw.stop()


# Connection caps and backpressure count WebSocket connections


CAPPED = """
[limits]
max_connections = 2

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""


def test_max_connections_counts_websocket_connections_over_all_listeners():
    gw = MemoryGateway(CAPPED)
    gw.connect("tcp")
    browser = gw.websocket("ws")
    assert browser.opened
    third = gw.connect("tcp")
    assert third.closed  # over max_connections = 2 (one tcp, one ws)
    fourth = gw.websocket("ws")
    assert not fourth.opened
    assert gw.bus.metrics.disconnects["max_connections"] == 2
    gw.reload(CAPPED.replace("max_connections = 2", "max_connections = 3"))
    assert gw.websocket("ws").opened
    gw.stop()


def test_pending_bytes_of_websocket_receivers_count_towards_the_total():
    config = CAPPED.replace(
        "max_connections = 2",
        "max_pending_bytes = 1048576\nmax_total_pending_bytes = 65536",
    )
    gw = MemoryGateway(config)
    sender = gw.connect("tcp")
    stalled = gw.websocket_connection("ws")
    stalled.stall()
    for _ in range(20):
        sender.send(b"y" * 8000 + b"\n")
    backpressure = gw.service.governor.backpressure
    assert backpressure.total_pending > 65536
    assert backpressure.backpressure  # every stream sender is paused
    assert gw.logged("bytes wait for slow receivers")
    gw.stop()


# A closing WebSocket waits as long as the drain allows


def test_a_closing_websocket_gets_the_drain_time_not_the_handshake_timeout():
    config = """
[gateway]
shutdown_timeout = 20

[limits]
handshake_timeout = 2

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""
    gw = MemoryGateway(config)
    connection = gw.websocket_connection("ws")
    connection.stall()  # never reads the close frame, so never answers it
    stopping = gw.service.stopService()
    gw.advance(5)
    assert not connection.closing  # past handshake_timeout, still within the drain
    gw.advance(16)
    assert connection.closing  # the drain's end cut it
    done: list[object] = []
    stopping.addBoth(done.append)
    gw.advance(1)
    assert done == [None]


def test_a_closing_tcp_peer_and_websocket_peer_get_the_same_deadline_outside_a_drain():
    config = """
[limits]
handshake_timeout = 3

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""
    gw = MemoryGateway(config)
    line = gw.connect("tcp")
    web = gw.websocket_connection("ws")
    line.stall()
    web.stall()
    line.peer.close("test")
    web.peer.close("test")
    gw.advance(2)
    assert not web.closing
    gw.advance(2)
    assert line.closing and web.closing
    gw.stop()


# Drops are counted per message on every transport


DROPPING = """
[limits]
slow_consumer = "drop"
max_pending_bytes = 1024

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""


def test_a_dropped_websocket_batch_counts_each_of_its_messages():
    gw = MemoryGateway(DROPPING)
    sender = gw.connect("tcp")
    connection = gw.websocket_connection("ws")
    connection.stall()
    sender.send(b"".join(b"m%03d" % i + b"x" * 96 + b"\n" for i in range(64)))
    assert gw.bus.metrics.dropped["slow_consumer"] == 64
    info = gw.bus.peer_info(connection.peer)
    assert info is not None
    assert info["messages_out"] == 0
    connection.unstall()
    sender.send(b"after\n")
    assert connection.client.texts() == ["after"]
    assert gw.bus.peer_info(connection.peer)["messages_out"] == 1  # type: ignore[index]
    gw.stop()


def test_a_dropped_tcp_batch_counts_each_of_its_messages_too():
    gw = MemoryGateway(DROPPING)
    sender, receiver = gw.connect("tcp"), gw.connect("tcp")
    receiver.stall()
    sender.send(b"".join(b"x" * 100 + b"\n" for _ in range(64)))
    assert gw.bus.metrics.dropped["slow_consumer"] == 64
    gw.stop()


# The bus reads only what IPeer declares


@implementer(IFramer)
class _Recorder:
    name = "recorder"

    def frame(self, batch: Batch) -> Batch:
        return batch

    def count(self, wire: Batch) -> int:
        return len(wire)


@implementer(IPeer)
class _DeclaredOnly:
    """A peer with exactly the attributes IPeer declares, and values of its own."""

    framer = _Recorder()
    channel = "main"
    echo = False
    address = "somewhere"
    subject = "CN-of-a-certificate"
    pending_bytes = 123
    dropped_messages = 2
    permissions = None

    def forbidden(self, action: str, channel: str) -> None:
        raise AssertionError(f"refused {action} {channel}")

    def __init__(self, peer_id: str) -> None:
        self.origin = Origin(peer_id, "custom", "custom")
        self.got: list[Batch] = []

    def deliver(self, wire: Batch) -> None:
        self.got.append(wire)

    def close(self, reason: str) -> None:
        pass


def test_peers_show_what_their_interface_declares():
    bus = Bus()
    sender, receiver = _DeclaredOnly("a"), _DeclaredOnly("b")
    bus.attach(sender)
    bus.attach(receiver)
    bus.publish(sender, Batch(sender.origin, "main", [b"1", b"2", b"3"]))
    info = bus.peer_info(receiver)
    assert info is not None
    assert info["pending_bytes"] == 123
    assert info["tls_subject"] == "CN-of-a-certificate"
    assert info["messages_out"] == 3 - 2  # what was dropped for it was not delivered


def test_every_transport_provides_the_whole_peer_interface(tmp_path):
    config = f"""
[[listeners]]
name = "tcp"
type = "tcp"
port = 8006

[[listeners]]
name = "tls"
type = "tls"
port = 8007
cert = "{tmp_path}/server.pem"
key = "{tmp_path}/server.key"
generate_dev_cert = true

[[listeners]]
name = "udp"
type = "udp"
port = 8008

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0

[[listeners]]
name = "wss"
type = "wss"
port = 8443
ping_interval = 0
cert = "{tmp_path}/server.pem"
key = "{tmp_path}/server.key"
"""
    gw = MemoryGateway(config, base=tmp_path)
    gw.connect("tcp")
    gw.connect("tls")
    gw.datagrams("udp").send(b"\n")
    gw.websocket("ws")
    gw.websocket("wss")
    gw.service.app_peer()
    peers = gw.peers()
    assert sorted(peer.origin.transport for peer in peers) == [
        "app",
        "tcp",
        "tls",
        "udp",
        "ws",
        "wss",
    ]
    for peer in peers:
        assert verifyObject(IPeer, peer)
        info = gw.bus.peer_info(peer)
        assert info is not None
        json.dumps(info)
    gw.stop()


# Listener settings: one class per type, with defaults


def test_each_listener_type_has_its_own_keys_and_defaults():
    from dataclasses import fields

    from gateway.config import (
        LISTENER_CLASSES,
        DtlsListenerConfig,
        TcpListenerConfig,
        UdpListenerConfig,
        WsListenerConfig,
    )

    assert list(LISTENER_CLASSES) == ["tcp", "tls", "ws", "wss", "udp", "dtls"]
    tcp = TcpListenerConfig(name="t")
    assert (tcp.type, tcp.host, tcp.port, tcp.channel, tcp.welcome, tcp.quit_command) == (
        "tcp",
        "127.0.0.1",
        0,
        "main",
        "",
        "",
    )
    assert WsListenerConfig(name="w").ping_interval == 30.0
    assert UdpListenerConfig(name="u").max_peers == 1024
    names = {cls.type: {f.name for f in fields(cls)} for cls in LISTENER_CLASSES.values()}
    assert "ping_interval" not in names["tcp"] and "quit_command" not in names["ws"]
    assert "tls" in names["tls"] and "tls" in names["wss"] and "tls" not in names["ws"]
    assert "welcome" not in names["udp"] and "endpoint" not in names["udp"]
    assert "challenge" not in LISTENER_CLASSES["dtls"].KEYS  # the cookie exchange, always on
    assert DtlsListenerConfig(name="d", tls=None).challenge  # type: ignore[arg-type]
    for kind, cls in LISTENER_CLASSES.items():
        keys = set(cls.KEYS) - {"type", "cert", "key", "client_ca", "min_tls", "generate_dev_cert"}
        inherited = {"challenge"} if kind == "dtls" else set()
        assert keys == names[kind] - {"tls"} - inherited, kind


def test_memory_gateway_finds_listeners_by_type_and_connects_websockets():
    gw = MemoryGateway(WS_ONLY.replace("allowed_origins", "# allowed_origins"))
    web = gw.connect("ws")
    line = gw.connect("tcp")
    line.send(b"both ways\n")
    assert web.client.texts() == ["both ways"]
    gw.stop()
