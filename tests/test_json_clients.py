"""JSON clients on every transport: subscribe, unsubscribe, publish to a channel, errors,
presence per channel, history on subscribe, and the starting channel in a WebSocket URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import MemoryGateway, StreamConnection
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL

CONFIG = """
[limits]
max_subscriptions = 3

[channels."room.*"]
history = 2

[[listeners]]
name = "raw"
type = "tcp"
port = 8006

[[listeners]]
name = "lines"
type = "tcp"
port = 8007
format = "json"

[[listeners]]
name = "udp"
type = "udp"
port = 8008
format = "json"

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""


@pytest.fixture
def gw() -> Iterator[MemoryGateway]:
    gateway = MemoryGateway(CONFIG)
    yield gateway
    gateway.stop()


def events(connection: StreamConnection) -> list[dict[str, Any]]:
    return [json.loads(line) for line in connection.lines()]


def udp_texts(port: Any) -> list[str]:
    received = [json.loads(datagram) for datagram in port.received()]
    return [e["text"] for e in received if e["type"] == "message"]


def send(connection: StreamConnection, *requests: dict[str, Any]) -> None:
    connection.send(b"".join(json.dumps(r).encode() + b"\n" for r in requests))


def test_a_json_lines_client_gets_a_welcome_and_message_events(gw):
    client = gw.connect("lines")
    welcome = events(client)
    assert welcome[0]["type"] == "welcome" and welcome[0]["channel"] == "main"
    raw = gw.connect("raw")
    raw.send(b"hello\n")
    assert events(client) == [
        {"type": "join", "peer": "raw-1", "transport": "tcp", "channel": "main", "count": 2},
        {
            "type": "message",
            "from": "raw-1",
            "transport": "tcp",
            "listener": "raw",
            "channel": "main",
            "text": "hello",
        },
    ]


def test_subscribe_publish_and_unsubscribe_on_every_transport(gw):
    lines = gw.connect("lines")
    browser = gw.websocket("ws", protocols=[JSON_SUBPROTOCOL])
    udp = gw.datagrams("udp")
    udp.send(b"\n")
    events(lines)
    browser.take()
    udp.received()

    send(lines, {"type": "subscribe", "channel": "room.*", "id": 1})
    browser.sendMessage(json.dumps({"type": "subscribe", "channel": "room.1", "id": "b"}).encode())
    gw.flush()
    udp.send(json.dumps({"type": "subscribe", "channel": "room.>"}).encode())
    assert events(lines) == [{"type": "subscribed", "channel": "room.*", "id": 1}]
    subscribed = [e for e in browser.events() if e["type"] == "subscribed"]
    epoch = subscribed[0]["epoch"]  # room.1 keeps history: its place (no message yet)
    assert subscribed == [
        {"type": "subscribed", "channel": "room.1", "offset": 0, "epoch": epoch, "id": "b"}
    ]
    assert [json.loads(d) for d in udp.received()] == [{"type": "subscribed", "channel": "room.>"}]

    raw = gw.connect("raw")  # a raw client stays on its listener's channel
    send(lines, {"type": "message", "channel": "room.1", "text": "to room 1"})
    got = [e for e in browser.events() if e["type"] == "message"]
    assert [(e["channel"], e["text"], e["from"]) for e in got] == [
        ("room.1", "to room 1", "lines-1")
    ]
    assert udp_texts(udp) == ["to room 1"]
    assert raw.lines() == []
    assert [e["type"] for e in events(lines)] == ["join"]  # the raw peer; no echo

    send(lines, {"type": "message", "text": "to main"})  # no channel: the listener's
    assert raw.lines() == [b"to main"]
    assert udp_texts(udp) == ["to main"]  # every client is on its listener's channel too

    send(lines, {"type": "unsubscribe", "channel": "room.*", "id": 2})
    assert events(lines) == [{"type": "unsubscribed", "channel": "room.*", "id": 2}]
    browser.sendMessage(json.dumps({"type": "message", "channel": "room.1", "text": "x"}).encode())
    gw.flush()
    assert events(lines) == []
    assert udp_texts(udp) == ["x"]


def test_overlapping_subscriptions_deliver_once_over_the_wire(gw):
    lines = gw.connect("lines")
    send(
        lines,
        {"type": "subscribe", "channel": "room.1"},
        {"type": "subscribe", "channel": "room.*"},
    )
    events(lines)
    raw = gw.connect("raw")
    gw.service.app_peer().publish("once", channel="room.1")
    gw.flush()
    assert [e["text"] for e in events(lines) if e["type"] == "message"] == ["once"]
    assert raw.lines() == []


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"type": "subscribe"}, "bad_channel"),
        ({"type": "subscribe", "channel": "a..b"}, "bad_channel"),
        ({"type": "message", "channel": "room.*", "text": "x"}, "bad_channel"),
        ({"type": "message", "channel": "room.1"}, "bad_request"),
        ({"type": "unsubscribe", "channel": "never"}, "not_subscribed"),
        ({"type": "subscribe", "channel": "a", "id": True}, "bad_request"),
    ],
)
def test_invalid_requests_are_answered_with_an_error_and_the_connection_stays(gw, request_, code):
    lines = gw.connect("lines")
    events(lines)
    send(lines, {**request_, **({"id": "q"} if "id" not in request_ else {})})
    (error,) = events(lines)
    assert error["type"] == "error" and error["code"] == code
    assert isinstance(error["reason"], str) and error["reason"]
    if request_.get("id") is not True:
        assert error["id"] == "q"
    assert not lines.closed
    send(lines, {"type": "subscribe", "channel": "fine"})
    assert events(lines) == [{"type": "subscribed", "channel": "fine"}]


def test_too_many_subscriptions(gw):
    lines = gw.connect("lines")
    events(lines)
    send(lines, *({"type": "subscribe", "channel": f"c{i}"} for i in range(3)))
    answers = events(lines)
    assert [a["type"] for a in answers] == ["subscribed", "subscribed", "error"]
    assert answers[2]["code"] == "too_many_subscriptions"  # main + c0 + c1 = 3


def test_anything_else_is_relayed_as_raw_text(gw):
    lines = gw.connect("lines")
    raw = gw.connect("raw")
    events(lines)
    lines.send(b'not json\n{"type":"chat"}\n[1,2]\n')
    assert raw.lines() == [b"not json", b'{"type":"chat"}', b"[1,2]"]


def test_history_replays_on_subscribe(gw):
    app = gw.service.app_peer()
    app.publish("a", "b", "c", channel="room.7")
    lines = gw.connect("lines")
    events(lines)
    send(lines, {"type": "subscribe", "channel": "room.7"})
    answers = events(lines)
    epoch = answers[0]["epoch"]
    assert answers[0] == {"type": "subscribed", "channel": "room.7", "offset": 3, "epoch": epoch}
    assert [(e["text"], e["history"], e["offset"]) for e in answers[1:]] == [
        ("b", True, 2),
        ("c", True, 3),
    ]


def test_presence_per_subscribed_channel(gw):
    watcher = gw.connect("lines")
    send(watcher, {"type": "subscribe", "channel": "room.1"})
    events(watcher)
    other = gw.websocket("ws", path="/ws/room.1")
    assert other.opened
    other.sendClose(1000)
    gw.flush()
    assert [(e["type"], e["channel"], e["peer"]) for e in events(watcher)] == [
        ("join", "room.1", "ws-1"),
        ("leave", "room.1", "ws-1"),
    ]


def test_a_websocket_url_names_the_starting_channel(gw):
    browser = gw.websocket("ws", path="/ws/room.3", protocols=[JSON_SUBPROTOCOL])
    assert browser.events()[0]["channel"] == "room.3"
    plain = gw.websocket("ws", path="/ws/room.3")
    gw.service.app_peer().publish("hi", channel="room.3")
    gw.flush()
    assert plain.texts() == ["hi"]
    reply = gw.http("ws", _upgrade("/ws/room..3")).value()
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"400"
    assert gw.bus.metrics.disconnects["bad_channel"] == 1


def test_format_is_validated(tmp_path: Path):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError) as error:
        MemoryGateway('[[listeners]]\nname = "t"\ntype = "tcp"\nport = 1\nformat = "xml"\n')
    assert str(error.value) == '<memory>: listeners[0].format: expected "raw" or "json", got "xml"'


def _upgrade(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def test_a_json_tls_listener_and_too_many_channels(tmp_path: Path):
    config = f"""
[limits]
max_channels = 2

[[listeners]]
name = "secure"
type = "tls"
port = 8007
format = "json"
cert = "{tmp_path}/server.pem"
key = "{tmp_path}/server.key"
generate_dev_cert = true
"""
    gw = MemoryGateway(config, base=tmp_path)
    client = gw.connect("secure")
    assert events(client)[0]["type"] == "welcome"
    send(client, {"type": "subscribe", "channel": "one"}, {"type": "subscribe", "channel": "two"})
    answers = events(client)
    assert answers[0] == {"type": "subscribed", "channel": "one"}
    assert answers[1]["type"] == "error" and answers[1]["code"] == "too_many_channels"
    other = gw.connect("secure")
    events(other)
    send(other, {"type": "message", "channel": "one", "text": "over tls"})
    assert [e["text"] for e in events(client) if e["type"] == "message"] == ["over tls"]
    gw.stop()


def test_presence_false_spares_a_listener_s_json_clients_every_peer_list_and_event():
    gw = MemoryGateway(
        '[channels."room.*"]\nhistory = 2\n'
        '[[listeners]]\nname = "quiet"\ntype = "tcp"\nport = 8006\nformat = "json"\n'
        "presence = false\n"
        '[[listeners]]\nname = "lines"\ntype = "tcp"\nport = 8007\nformat = "json"\n'
    )
    try:
        quiet = gw.connect("quiet")
        assert events(quiet) == [
            {"type": "welcome", "peer": "quiet-1", "count": 1, "channel": "main", "presence": False}
        ]
        chatty = gw.connect("lines")
        assert {"peer": "quiet-1", "transport": "tcp"} in events(chatty)[0]["peers"]
        send(quiet, {"type": "subscribe", "channel": "room.1"})
        assert [(e["type"], e["channel"], e["offset"]) for e in events(quiet)] == [
            ("subscribed", "room.1", 0)
        ]
        send(chatty, {"type": "subscribe", "channel": "room.1"})
        other = gw.connect("lines")
        other.lines()
        send(other, {"type": "message", "channel": "room.1", "text": "hi"})
        # Messages as ever, but no join/leave: not on main, not on room.1.
        assert [e["type"] for e in events(quiet)] == ["message"]
        assert "join" in [e["type"] for e in events(chatty)]
        other.close()
        gw.flush()
        assert events(quiet) == []
        # History still replays on subscribe: presence is only about who is there.
        late = gw.connect("quiet")
        late.lines()
        send(late, {"type": "subscribe", "channel": "room.2"})
        assert [e["type"] for e in events(late)] == ["subscribed"]
        send(chatty, {"type": "message", "channel": "room.2", "text": "kept"})
        again = gw.connect("quiet")
        again.lines()
        send(again, {"type": "subscribe", "channel": "room.2"})
        replayed = events(again)
        assert replayed[0]["type"] == "subscribed"
        assert (replayed[1]["text"], replayed[1]["history"]) == ("kept", True)
    finally:
        gw.stop()
