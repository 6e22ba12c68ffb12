"""Signing in with a token or a password, on every stream transport, raw and JSON: the
first message, its deadline, what waits behind it, lockout, reload, and no secret in logs."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.auth.credentials import hash_password, token_digest
from gateway.config import ConfigError, parse
from gateway.testing import MemoryGateway, StreamConnection
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL
from gateway.transports.websocket.peer import CLOSE_AUTH

TOKEN = "tok-3b1f9e0c-not-a-real-secret"
PASSWORD = "correct horse battery staple"
HASH = hash_password(PASSWORD)

CONFIG = f"""
[limits]
auth_timeout = 5
max_auth_failures = 3

[roles.member]
publish = ["main", "room.*"]
subscribe = ["main", "room.*"]

[roles.guest]
subscribe = ["main"]

[auth.users.alice]
password = "{HASH}"
roles = ["member"]

[auth.tokens.sensor]
sha256 = "{token_digest(TOKEN)}"
roles = ["member"]

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006
auth = ["password", "token"]
welcome = "hello {{user}} ({{peer}})"

[[listeners]]
name = "lines"
type = "tcp"
port = 8007
format = "json"
auth = ["password", "token"]

[[listeners]]
name = "open"
type = "tcp"
port = 8009
auth = ["token"]
anonymous_role = "guest"

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
auth = ["password", "token"]
"""


@pytest.fixture
def gw() -> Iterator[MemoryGateway]:
    gateway = MemoryGateway(CONFIG)
    yield gateway
    gateway.stop()


def events(connection: StreamConnection) -> list[dict[str, Any]]:
    return [json.loads(line) for line in connection.lines()]


def signed_in_json(gw: MemoryGateway) -> StreamConnection:
    client = gw.connect("lines")
    client.send(b'{"type":"auth","user":"alice","password":"%s"}\n' % PASSWORD.encode())
    assert events(client)[0]["user"] == "alice"
    return client


def test_a_raw_peer_signs_in_with_a_token_and_what_it_sent_behind_it_is_kept(gw):
    watcher = signed_in_json(gw)
    raw = gw.connect("tcp")
    assert raw.lines() == []  # no welcome before signing in
    raw.send(f"AUTH token {TOKEN}\nfirst\nsecond\n".encode())
    assert raw.lines() == [b"hello sensor (tcp-1)"]
    got = [e for e in events(watcher) if e["type"] == "message"]
    assert [(e["text"], e["user"], e["from"]) for e in got] == [
        ("first", "sensor", "tcp-1"),
        ("second", "sensor", "tcp-1"),
    ]
    assert gw.bus.metrics.sign_ins["tcp", "token", "ok"] == 1


def test_a_raw_peer_signs_in_with_a_password(gw):
    raw = gw.connect("tcp")
    raw.send(f"AUTH password alice {PASSWORD}\r\n".encode())
    assert raw.lines() == [b"hello alice (tcp-1)"]


@pytest.mark.parametrize(
    "first",
    [
        b"AUTH password alice wrong\n",
        b"AUTH password bob " + PASSWORD.encode() + b"\n",
        b"AUTH token nope\n",
        b"AUTH jwt abc\n",  # not a method of this listener
        b"AUTH token\n",
        b"hello\n",  # no anonymous_role: signing in is a must
    ],
)
def test_a_failed_sign_in_is_told_and_closed(gw, first):
    watcher = signed_in_json(gw)
    raw = gw.connect("tcp")
    raw.send(first + b"after\n")
    assert raw.lines() == [b"gateway: authentication failed"]
    assert raw.closed
    assert [e for e in events(watcher) if e["type"] == "message"] == []
    assert gw.logged("did not sign in") != []


def test_signing_in_has_a_deadline(gw):
    raw = gw.connect("tcp")
    gw.advance(4.9)
    assert not raw.closed
    gw.advance(0.2)
    assert raw.lines() == [b"gateway: authentication timed out"]
    assert raw.closed
    assert gw.bus.metrics.sign_ins["tcp", "none", "timeout"] == 1


def test_with_an_anonymous_role_a_first_message_that_is_no_sign_in_is_an_ordinary_one(gw):
    watcher = signed_in_json(gw)
    guest = gw.connect("open")
    guest.send(b"hello\n")  # anonymous: guest may read main, not publish
    assert guest.lines() == [b"gateway: not allowed to publish to main"]
    assert [e for e in events(watcher) if e["type"] == "message"] == []
    watcher.send(b'{"type":"message","text":"to all"}\n')
    gw.flush()
    assert guest.lines() == [b"to all"]
    member = gw.connect("open")
    member.send(f"AUTH token {TOKEN}\nfrom the sensor\n".encode())
    gw.flush()
    assert guest.lines() == [b"from the sensor"]


def test_json_clients_sign_in_with_the_auth_envelope(gw):
    client = gw.connect("lines")
    client.send(json.dumps({"type": "auth", "token": TOKEN}).encode() + b"\n")
    welcome = events(client)[0]
    assert welcome["type"] == "welcome" and welcome["user"] == "sensor"
    bad = gw.connect("lines")
    bad.send(b'{"type":"auth","user":"alice","password":"nope"}\n')
    assert events(bad) == [
        {"type": "error", "code": "auth_failed", "reason": "authentication failed"}
    ]
    assert bad.closed


@pytest.mark.parametrize("json_client", [False, True])
def test_websocket_clients_sign_in_with_their_first_message(gw, json_client):
    protocols = [JSON_SUBPROTOCOL] if json_client else None
    good = gw.websocket("ws", protocols=protocols)
    first = json.dumps({"type": "auth", "token": TOKEN}) if json_client else f"AUTH token {TOKEN}"
    good.sendMessage(first.encode())
    good.sendMessage(b"queued behind it")
    gw.flush()
    watcher = signed_in_json(gw)
    good.sendMessage(b"later")
    gw.flush()
    texts = [e["text"] for e in events(watcher) if e["type"] == "message"]
    assert texts == ["later"]  # "queued behind it" went out before the watcher joined
    bad = gw.websocket("ws", protocols=protocols)
    bad.sendMessage(b"AUTH token wrong" if not json_client else b'{"type":"auth","token":"x"}')
    gw.flush()
    assert bad.closed is not None and bad.closed[1] == CLOSE_AUTH


def test_repeated_failures_lock_the_source_out_for_a_minute(gw):
    for _ in range(4):
        client = gw.connect("tcp", host="127.0.0.9")
        client.send(b"AUTH token wrong\n")
        assert client.closed
    refused = gw.connect("tcp", host="127.0.0.9")
    assert refused.closed and refused.lines() == []
    assert gw.bus.metrics.disconnects["auth_lockout"] == 1
    other = gw.connect("tcp", host="127.0.0.10")
    other.send(f"AUTH token {TOKEN}\n".encode())
    assert other.lines() == [b"hello sensor (tcp-1)"]  # only peers that joined get ids
    gw.advance(61)
    again = gw.connect("tcp", host="127.0.0.9")
    again.send(f"AUTH token {TOKEN}\n".encode())
    assert again.lines()[0].startswith(b"hello sensor")


def test_a_reload_disconnects_removed_tokens_and_narrows_roles(gw):
    sensor = gw.connect("lines")
    sensor.send(json.dumps({"type": "auth", "token": TOKEN}).encode() + b"\n")
    alice = signed_in_json(gw)
    alice.send(b'{"type":"subscribe","channel":"room.1"}\n')
    events(sensor)
    assert [e["type"] for e in events(alice)][-1] == "subscribed"
    without_token = (
        CONFIG.split("[auth.tokens.sensor]", maxsplit=1)[0]
        + CONFIG.split('roles = ["member"]\n', 2)[2]
    )
    narrowed = without_token.replace(
        'publish = ["main", "room.*"]\nsubscribe = ["main", "room.*"]',
        'publish = ["main"]\nsubscribe = ["main"]',
    )
    assert gw.reload(narrowed) == []
    assert sensor.closed
    assert {"type": "unsubscribed", "channel": "room.1", "reason": "forbidden"} in events(alice)
    assert not alice.closed


def test_no_secret_ever_reaches_a_log_line(gw):
    gw.connect("tcp").send(f"AUTH password alice {PASSWORD}\n".encode())
    gw.connect("tcp").send(f"AUTH token {TOKEN}\n".encode())
    gw.connect("tcp").send(b"AUTH password alice hunter2-wrong\n")
    gw.connect("lines").send(b'{"type":"auth","token":"tok-wrong-secret"}\n')
    gw.flush()
    text = "\n".join(str(event) for event in gw.log_events())
    for secret in (PASSWORD, TOKEN, "hunter2-wrong", "tok-wrong-secret", HASH):
        assert secret not in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('auth = ["jwt"]\n', '"jwt" needs \\[auth\\] jwt_algorithms'),
        ('auth = ["magic"]\n', 'expected "password", "token", "jwt" or "cert"'),
        ('auth = ["cert"]\n', '"cert" needs a tls, wss or dtls listener with client_ca'),
    ],
)
def test_listener_auth_errors(extra, message):
    text = f'[[listeners]]\nname = "x"\ntype = "tcp"\nport = 1\n{extra}'
    with pytest.raises(ConfigError, match=message):
        parse(tomllib.loads(text), "c.toml")


def test_udp_cannot_sign_in():
    text = '[[listeners]]\nname = "u"\ntype = "udp"\nport = 1\nauth = ["token"]\n'
    with pytest.raises(ConfigError, match="cannot sign peers in"):
        parse(tomllib.loads(text), "c.toml")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[auth.users.a]\npassword = "hunter2"\n', "auth.users.a.password: not a password hash"),
        ('[auth.users.a]\nroles = ["nobody"]\n', "auth.users.a.roles: no [roles.nobody] table"),
        ('[auth.tokens.t]\nsha256 = "abc"\n', "auth.tokens.t.sha256:"),
        ("[auth.tokens.t]\nroles = []\n", "auth.tokens.t.sha256: missing"),
        ("[auth.jwt]\n", "auth.jwt: unknown key"),
    ],
)
def test_auth_errors_name_the_key_and_never_show_the_secret(table, message):
    text = table + '[[listeners]]\nname = "x"\ntype = "tcp"\nport = 1\n'
    with pytest.raises(ConfigError) as caught:
        parse(tomllib.loads(text), "c.toml")
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_listener_with_auth_may_face_other_hosts():
    text = '[[listeners]]\nname = "x"\ntype = "tcp"\nhost = "0.0.0.0"\nport = 1\nauth = ["token"]\n'
    assert parse(tomllib.loads(text), "c.toml").listeners[0].auth == ("token",)


def test_peers_shows_the_user_and_never_a_credential(gw):
    raw = gw.connect("tcp")
    raw.send(f"AUTH token {TOKEN}\n".encode())
    raw.lines()
    (peer,) = [p for p in gw.peers() if p.origin.listener == "tcp"]
    info = gw.bus.peer_info(peer)
    assert info is not None and info["user"] == "sensor"
    assert TOKEN not in json.dumps(info) and token_digest(TOKEN) not in json.dumps(info)


@pytest.mark.parametrize(
    ("json_client", "sign_in", "first"),
    [
        (False, ("token", "t"), b"AUTH token t"),
        (False, ("jwt", "a.b.c"), b"AUTH jwt a.b.c"),
        (False, ("password", "alice", "two words"), b"AUTH password alice two words"),
        (True, ("jwt", "a.b.c"), b'{"type":"auth","jwt":"a.b.c"}'),
        (True, ("password", "alice", "pw"), b'{"type":"auth","user":"alice","password":"pw"}'),
    ],
)
def test_gateway_client_signs_in_with_its_first_message(json_client, sign_in, first):
    from gateway.cli.speech import Speech

    assert Speech(json_client, (), sign_in).opening() == [first]
