"""Roles and ``anonymous_role``: what peers may publish, subscribe to and receive, on every
transport; and that a listener others can reach is never open by accident."""

from __future__ import annotations

import json
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.roles import Permissions, Role
from gateway.config import ConfigError, parse
from gateway.core.channels import covers, matches
from gateway.ops.admin import AdminSite
from gateway.testing import MemoryGateway, StreamConnection
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL
from tests.conftest import GATEWAY, TIMEOUT, metric

# The engine

TOKENS = st.sampled_from(["a", "b", "*", ">"])
PATTERNS = (
    st.lists(TOKENS, min_size=1, max_size=4).filter(lambda t: ">" not in t[:-1]).map(".".join)
)
NAMES = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5).map(".".join)


@settings(max_examples=400)
@given(PATTERNS, PATTERNS, st.lists(NAMES, max_size=30))
def test_covers_means_every_name_one_matches_the_other_matches(outer, inner, names):
    if covers(outer, inner):
        assert all(matches(outer, n) for n in names if matches(inner, n))
    # And it is not vacuous: a name the inner one matches but the outer does not disproves it.
    if any(matches(inner, n) and not matches(outer, n) for n in names):
        assert not covers(outer, inner)


def test_covers():
    assert covers("room.>", "room.*") and covers("room.>", "room.42.x") and covers(">", "a")
    assert covers("room.*", "room.42") and covers("room.*", "room.*")
    assert not covers("room.*", "room.>") and not covers("room.42", "room.*")
    assert not covers("room.>", "room") and not covers("a.*", "a.b.c")


def test_deny_beats_allow_and_no_match_is_denied():
    role = Role("r", publish=("room.>",), subscribe=("room.>",), deny_publish=("room.admin",))
    p = Permissions([role], None)
    assert p.may_publish("room.1") and not p.may_publish("room.admin")
    assert not p.may_publish("lobby")
    assert p.may_subscribe("room.*") and p.may_subscribe("room.admin")
    assert not p.may_subscribe(">")  # not covered by room.>


def test_an_empty_role_allows_nothing():
    p = Permissions([Role("empty")], None)
    assert not p.may_publish("main") and not p.may_subscribe("main")
    assert not Permissions([], None).may_publish("main")


def test_several_roles_join_their_allows_and_their_denies():
    reader = Role("reader", subscribe=("news.>",), deny_subscribe=("news.secret",))
    writer = Role("writer", publish=("news.>",), subscribe=("chat.*",))
    p = Permissions([reader, writer], None)
    assert p.may_subscribe("news.*") and p.may_subscribe("chat.1") and p.may_publish("news.1")
    assert not p.may_subscribe("news.secret")  # covered by a deny
    assert p.may_receive("news.1") and not p.may_receive("news.secret")


@pytest.mark.parametrize("user", ["a.b", "*", ">", "x*", None, ""])
def test_a_user_name_with_wildcard_characters_never_matches_a_user_pattern(user):
    role = Role("own", publish=("inbox.{user}", "public"), subscribe=("inbox.{user}.>",))
    p = Permissions([role], user)
    assert p.may_publish("public")
    for channel in ("inbox.a", "inbox.a.b", "inbox.x"):
        assert not p.may_publish(channel)
    assert not p.may_subscribe("inbox.>") and not p.may_subscribe("inbox.*.>")


def test_a_user_pattern_is_the_users_own():
    p = Permissions([Role("own", publish=("inbox.{user}",), subscribe=("u.{user}.>",))], "alice")
    assert p.may_publish("inbox.alice") and not p.may_publish("inbox.bob")
    assert p.may_subscribe("u.alice.*") and not p.may_subscribe("u.*.x")


# Configuration

ROLES = """
[roles.reader]
subscribe = ["main", "room.>"]
deny_subscribe = ["room.admin"]

[roles.writer]
publish = ["main", "room.*"]
subscribe = ["main", "room.>"]
deny_publish = ["room.admin"]
"""


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(tomllib.loads(text), "c.toml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("listener", "key"),
    [
        ('type = "tcp"\nhost = "0.0.0.0"\nport = 1\n', "0.0.0.0"),
        ('type = "udp"\nhost = "::"\nport = 1\n', "::"),
        ('type = "ws"\nendpoint = "tcp:8080"\n', "tcp:8080"),
        ('type = "tls"\nendpoint = "systemd:domain=INET:index=0"\ncert = "a"\nkey = "b"\n', "sys"),
    ],
)
def test_a_listener_others_can_reach_needs_a_role(listener, key):
    message = config_error(f'[[listeners]]\nname = "x"\n{listener}')
    assert message.startswith("c.toml: listeners[0].anonymous_role: missing: the listener is ")
    assert key in message and "and/or anonymous_role" in message


def test_loopback_and_unix_sockets_may_stay_open():
    for listener in (
        'host = "127.0.0.1"\nport = 1\n',
        'host = "::1"\nport = 1\n',
        'endpoint = "unix:/tmp/g"\n',
    ):
        config = parse(tomllib.loads(f'[[listeners]]\nname = "x"\ntype = "tcp"\n{listener}'), "c")
        assert config.listeners[0].anonymous_role is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[listeners]]\nname = "x"\ntype = "tcp"\nport = 1\nanonymous_role = "nobody"\n'
            + ROLES,
            "c.toml: listeners[0].anonymous_role: no [roles.nobody] table (roles defined: reader, writer)",
        ),
        (
            '[roles.r]\npublish = ["a..b"]\n',
            'c.toml: roles.r.publish: "a..b": not a channel name or pattern',
        ),
        (
            '[roles.r]\npublish = "main"\n',
            "c.toml: roles.r.publish: expected a list of channel patterns",
        ),
        (
            '[roles.r]\npublsh = ["main"]\n',
            'c.toml: roles.r.publsh: unknown key (did you mean "publish"?)',
        ),
    ],
)
def test_role_errors_name_the_key(text, message):
    if "[[listeners]]" not in text:
        text += '[[listeners]]\nname = "x"\ntype = "tcp"\nport = 1\n'
    assert config_error(text).startswith(message)


def test_an_open_listener_on_every_interface_does_not_start(tmp_path: Path):
    config = tmp_path / "open.toml"
    config.write_text('[[listeners]]\nname = "tcp"\ntype = "tcp"\nhost = "0.0.0.0"\nport = 0\n')
    result = subprocess.run(
        [*GATEWAY, "--config", str(config)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 2
    assert "listeners[0].anonymous_role: missing" in result.stderr


# Enforcement, on every transport

CONFIG = (
    ROLES
    + """
[channels."room.*"]
history = 5

[[listeners]]
name = "raw"
type = "tcp"
port = 8006
anonymous_role = "reader"

[[listeners]]
name = "lines"
type = "tcp"
port = 8007
format = "json"
anonymous_role = "writer"

[[listeners]]
name = "udp"
type = "udp"
port = 8008
format = "json"
anonymous_role = "writer"

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
anonymous_role = "writer"

[[listeners]]
name = "lobby"
type = "tcp"
port = 8009
channel = "lobby"
anonymous_role = "writer"
"""
)


@pytest.fixture
def gw() -> Iterator[MemoryGateway]:
    gateway = MemoryGateway(CONFIG)
    yield gateway
    gateway.stop()


def events(connection: StreamConnection) -> list[dict[str, Any]]:
    return [json.loads(line) for line in connection.lines()]


def send(connection: StreamConnection, *requests: dict[str, Any]) -> None:
    connection.send(b"".join(json.dumps(r).encode() + b"\n" for r in requests))


def test_a_raw_peer_may_not_publish_where_its_role_does_not_allow(gw):
    raw, lines = gw.connect("raw"), gw.connect("lines")
    events(lines)
    raw.send(b"one\ntwo\n")
    raw.send(b"three\n")
    assert raw.lines() == [b"gateway: not allowed to publish to main"]  # once a second
    assert events(lines) == []
    gw.advance(1.1)
    raw.send(b"four\n")
    assert raw.lines() == [b"gateway: not allowed to publish to main"]
    assert not raw.closed
    # What it may do, it does: read its channel.
    send(lines, {"type": "message", "text": "hello"})
    assert raw.lines() == [b"hello"]
    assert gw.bus.metrics.denied["publish"] == 3
    assert gw.bus.metrics.dropped["forbidden"] == 4


def test_json_clients_get_forbidden_errors_with_their_ids(gw):
    lines = gw.connect("lines")
    events(lines)
    send(
        lines,
        {"type": "subscribe", "channel": "secret", "id": 1},
        {"type": "subscribe", "channel": ">", "id": 2},
        {"type": "message", "channel": "room.admin", "text": "x", "id": 3},
    )
    got = events(lines)
    assert [(e["type"], e.get("code"), e.get("id")) for e in got] == [
        ("error", "forbidden", 1),
        ("error", "forbidden", 2),
        ("error", "forbidden", 3),
    ]
    # The plain form (no id) is refused by the bus the same way.
    lines.send(b'{"type":"message","channel":"lobby.x","text":"y"}\n')
    assert events(lines) == [
        {
            "type": "error",
            "code": "forbidden",
            "reason": "not allowed to publish to lobby.x",
            "channel": "lobby.x",
        }
    ]
    assert not lines.closed


def test_a_denied_channel_never_arrives_through_a_wildcard(gw):
    reader = gw.connect("raw")  # reader: may subscribe room.> but not room.admin
    lines = gw.connect("lines")
    events(lines)
    browser = gw.websocket("ws", protocols=[JSON_SUBPROTOCOL])
    browser.take()
    udp = gw.datagrams("udp")
    udp.send(b'{"type":"subscribe","channel":"room.>"}')
    browser.sendMessage(b'{"type":"subscribe","channel":"room.>"}')
    gw.flush()
    assert [json.loads(d)["type"] for d in udp.received()][-1] == "subscribed"
    browser.take()
    app = gw.service.app_peer()
    app.publish("to one", channel="room.1")
    app.publish("to admins", channel="room.admin")
    gw.flush()
    # writer's deny is for publishing only: its subscription gets both.
    assert [e["text"] for e in browser.events() if e["type"] == "message"] == [
        "to one",
        "to admins",
    ]
    assert reader.lines() == []


def test_reader_wildcard_subscription_skips_the_denied_channel():
    gw = MemoryGateway(
        ROLES
        + '[[listeners]]\nname = "r"\ntype = "tcp"\nport = 8006\nformat = "json"\n'
        + 'anonymous_role = "reader"\n'
    )
    try:
        reader = gw.connect("r")
        events(reader)
        send(reader, {"type": "subscribe", "channel": "room.>"})
        assert events(reader)[0]["type"] == "subscribed"
        app = gw.service.app_peer()
        app.publish("a", channel="room.1")
        app.publish("secret", channel="room.admin")
        app.publish("b", channel="room.2.x")
        gw.flush()
        assert [e["text"] for e in events(reader) if e["type"] == "message"] == ["a", "b"]
        # Asked for by name, the denied channel is refused.
        send(reader, {"type": "subscribe", "channel": "room.admin", "id": "x"})
        assert events(reader)[0]["code"] == "forbidden"
    finally:
        gw.stop()


def test_a_denied_starting_channel_is_not_joined(gw):
    lobby = gw.connect("lobby")  # writer may not subscribe to "lobby"
    lines = gw.connect("lines")
    events(lines)
    gw.service.app_peer().publish("in the lobby", channel="lobby")
    gw.flush()
    assert lobby.lines() == []
    assert gw.bus.subscriptions(gw.peers()[0]) == []
    reply = gw.http("ws", _upgrade("/ws/secret")).value()
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"403"
    ok = gw.websocket("ws", path="/ws/room.5", protocols=[JSON_SUBPROTOCOL])
    assert ok.events()[0]["channel"] == "room.5"


def test_history_is_not_replayed_where_the_peer_may_not_read(gw):
    lines = gw.connect("lines")
    events(lines)
    send(lines, {"type": "message", "channel": "room.admin", "text": "x"})  # denied: not kept
    send(lines, {"type": "message", "channel": "room.1", "text": "kept"})
    late = gw.connect("lines")
    events(late)
    send(late, {"type": "subscribe", "channel": "room.1"})
    got = events(late)
    assert got[0]["type"] == "subscribed" and got[1]["text"] == "kept" and got[1]["history"]


def test_a_reload_ends_subscriptions_the_roles_no_longer_allow(gw):
    lines = gw.connect("lines")
    raw = gw.connect("raw")
    events(lines)
    send(
        lines,
        {"type": "subscribe", "channel": "room.1"},
        {"type": "subscribe", "channel": "room.*"},
    )
    assert [e["type"] for e in events(lines)] == ["subscribed", "subscribed"]
    narrowed = CONFIG.replace(
        'subscribe = ["main", "room.>"]\ndeny_publish',
        'subscribe = ["main", "room.2"]\ndeny_publish',
    ).replace('subscribe = ["main", "room.>"]\ndeny_subscribe', "subscribe = []\ndeny_subscribe")
    assert narrowed != CONFIG
    assert gw.reload(narrowed) == []
    got = events(lines)
    assert sorted((e["type"], e["channel"], e["reason"]) for e in got if "reason" in e) == [
        ("unsubscribed", "room.*", "forbidden"),
        ("unsubscribed", "room.1", "forbidden"),
    ]
    assert raw.lines() == [b"gateway: no longer allowed to read main"]
    app = gw.service.app_peer()
    app.publish("after", channel="room.1")
    app.publish("still", channel="main")
    gw.flush()
    assert [e["text"] for e in events(lines) if e["type"] == "message"] == ["still"]
    assert raw.lines() == []
    assert any("no longer allowed to subscribe to room.1" in line for line in gw.logged("reload"))


def test_metrics_count_refusals(gw):
    lines = gw.connect("lines")
    events(lines)
    send(lines, {"type": "subscribe", "channel": "secret"})
    send(lines, {"type": "message", "channel": "secret", "text": "x"})
    text = AdminSite(gw.service, gw.reactor).metrics(_Request()).decode()  # type: ignore[arg-type]
    assert metric(text, "gateway_authz_denied_total", action="publish") == 1
    assert metric(text, "gateway_authz_denied_total", action="subscribe") == 1


class _Request:
    def setHeader(self, name: bytes, value: bytes) -> None:
        pass


def _upgrade(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def test_the_examples_in_security_md_are_valid_configs(tmp_path: Path):
    text = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]
    assert len(blocks) >= 4
    (tmp_path / "jwt.secret").write_bytes(b"s" * 32)  # the files the examples name
    for block in blocks:
        body = "\n".join(line.strip() for line in block.splitlines())  # indented in a list
        if "[[listeners]]" not in body:  # a fragment: with a listener of its own
            body += '\n[[listeners]]\nname = "x"\ntype = "tcp"\nport = 1\n'
        config = parse(tomllib.loads(body), "security.md", tmp_path / "security.toml")
        assert all(
            lc.local or lc.auth or lc.anonymous_role in config.roles for lc in config.listeners
        )
