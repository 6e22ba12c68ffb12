"""History in Redis (``[history] store = "redis"``) with real gateway processes on a real
``redis-server``: offsets that agree on every node, a client that recovers on another node
than it left, raw peers' replay, and Redis down during a recovery."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from tests.conftest import (
    JSON_SUBPROTOCOL,
    TIMEOUT,
    GatewayProcess,
    Line,
    RedisServer,
    admin_get,
    metric,
    websocket,
)
from tests.toml import toml_listener, toml_table


def node(run_gateway: Any, redis_server: RedisServer, name: str) -> GatewayProcess:
    gw: GatewayProcess = run_gateway(
        toml_table("cluster", redis=redis_server.url, node=name, prefix="hist")
        + toml_table("history", store="redis")
        + toml_table("channels.main", history=2000)
        + toml_table('channels."room.*"', history=5)
        + toml_table('channels."short.*"', history=10, history_ttl=0.5)
        + toml_table("admin", port=0)
        + toml_listener("tcp")
        + toml_listener("json", "tcp", format="json")
        + toml_listener("ws", ping_interval=0),
        listeners=4,  # and the admin listener
    )
    gw.wait_for("backplane up")
    return gw


def event(client: Any) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(client.recv(timeout=TIMEOUT))
    return found


def messages(client: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` message events (presence events skipped)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        next_one = event(client)
        if next_one["type"] == "message":
            found.append(next_one)
    return found


def json_line(line: Line) -> dict[str, Any]:
    while True:
        found: dict[str, Any] = json.loads(line.line())
        if found["type"] not in ("join", "leave"):
            return found


def test_a_client_recovers_on_another_node_exactly_once_in_order(run_gateway, redis_server):
    a, b, c = (node(run_gateway, redis_server, name) for name in ("gw-a", "gw-b", "gw-c"))
    with websocket(a, subprotocols=[JSON_SUBPROTOCOL]) as client:
        welcome = event(client)
        assert (welcome["type"], welcome["offset"]) == ("welcome", 0)
        epoch = welcome["epoch"]
        publisher = Line(b.ports["tcp"])  # a raw peer on another node
        publisher.send(b"".join(b"m%d\n" % i for i in range(1, 11)))
        seen = messages(client, 10)
    assert [(m["text"], m["offset"], m["epoch"]) for m in seen] == [
        (f"m{i}", i, epoch) for i in range(1, 11)
    ]
    # A witness on the third node: the channel's history, then the same offsets live.
    with websocket(c, subprotocols=[JSON_SUBPROTOCOL]) as witness:
        assert (event(witness)["epoch"], event(witness)["history"]) == (epoch, True)
        messages(witness, 9)
        publisher.send(b"".join(b"m%d\n" % i for i in range(11, 1011)))
        live = messages(witness, 1000)
    assert [(m["text"], m["offset"], "history" in m) for m in live] == [
        (f"m{i}", i, False) for i in range(11, 1011)
    ]
    # The client comes back on the third node: all 1,000 it missed, once each, in order.
    with websocket(
        c, path=f"/ws/main?since=10&epoch={epoch}", subprotocols=[JSON_SUBPROTOCOL]
    ) as client:
        welcome = event(client)
        assert (welcome["recovered"], welcome["offset"], welcome["epoch"]) == (True, 1010, epoch)
        missed = messages(client, 1000)
        assert [(m["text"], m["offset"], m.get("recovered")) for m in missed] == [
            (f"m{i}", i, True) for i in range(11, 1011)
        ]
        publisher.send(b"after\n")
        after = messages(client, 1)[0]
        assert (after["text"], after["offset"], "recovered" in after) == ("after", 1011, False)
    # A raw peer joining any node gets the last messages, as with the memory store.
    late = Line(a.ports["tcp"])
    assert late.lines(1011) == [b"m%d" % i for i in range(1, 1011)] + [b"after"]
    late.close()
    publisher.close()


def test_a_subscribe_with_since_on_another_node_and_live_messages_without_a_gap(
    run_gateway, redis_server
):
    a, b = node(run_gateway, redis_server, "gw-a"), node(run_gateway, redis_server, "gw-b")
    first = Line(a.ports["json"])
    assert json_line(first)["type"] == "welcome"
    first.send(b'{"type":"subscribe","channel":"room.1","id":1}\n')
    subscribed = json_line(first)
    assert (subscribed["type"], subscribed["offset"]) == ("subscribed", 0)
    epoch = subscribed["epoch"]
    for i in range(1, 4):
        first.send(b'{"type":"message","channel":"room.1","text":"r%d"}\n' % i)
    first.close()
    second = Line(b.ports["json"])
    assert json_line(second)["type"] == "welcome"
    # Wait for the third message to be numbered: a client on b subscribes without since.
    watcher = Line(b.ports["json"])
    json_line(watcher)
    watcher.send(b'{"type":"subscribe","channel":"room.1"}\n')
    answer = json_line(watcher)
    replay = [json_line(watcher) for _ in range(3)]
    assert answer["type"] == "subscribed"
    assert [(m["text"], m["offset"], m["history"]) for m in replay] == [
        ("r1", 1, True),
        ("r2", 2, True),
        ("r3", 3, True),
    ]
    since = json.dumps({"offset": 1, "epoch": epoch}).encode()
    second.send(b'{"type":"subscribe","channel":"room.1","since":%s,"id":7}\n' % since)
    recovered = [json_line(second) for _ in range(3)]
    assert [(m.get("text"), m.get("offset"), m.get("recovered")) for m in recovered] == [
        ("r2", 2, True),
        ("r3", 3, True),
        (None, 3, True),
    ]
    assert (recovered[2]["type"], recovered[2]["id"]) == ("subscribed", 7)
    watcher.send(b'{"type":"message","channel":"room.1","text":"r4"}\n')
    live = json_line(second)
    assert (live["text"], live["offset"], "recovered" in live) == ("r4", 4, False)
    # Too old for a window of 5: recovered false, then the last 5 as a plain replay.
    for i in range(5, 12):
        watcher.send(b'{"type":"message","channel":"room.1","text":"r%d"}\n' % i)
    third = Line(a.ports["json"])
    json_line(third)
    while json_line(second)["text"] != "r11":
        pass
    third.send(b'{"type":"subscribe","channel":"room.1","since":%s}\n' % since)
    answer = json_line(third)
    assert (answer["type"], answer["recovered"], answer["offset"]) == ("subscribed", False, 11)
    replay = [json_line(third) for _ in range(5)]
    assert [(m["text"], m["history"]) for m in replay] == [(f"r{i}", True) for i in range(7, 12)]
    for line in (second, watcher, third):
        line.close()


def test_redis_down_during_a_recovery(run_gateway, redis_server):
    a, b = node(run_gateway, redis_server, "gw-a"), node(run_gateway, redis_server, "gw-b")
    publisher = Line(a.ports["tcp"])
    with websocket(b, subprotocols=[JSON_SUBPROTOCOL]) as client:
        epoch = event(client)["epoch"]
        publisher.send(b"one\ntwo\n")
        assert [m["offset"] for m in messages(client, 2)] == [1, 2]
    redis_server.kill()
    a.wait_for("backplane down")
    b.wait_for("backplane down")
    assert admin_get(a, "/healthz") == (
        503,
        "backplane: down\nhistory: redis failing: Redis unreachable\n",
    )
    assert metric(admin_get(a, "/metrics")[1], "gateway_history_store_up", store="redis") == 0
    # Recovery cannot be told: recovered false, and live delivery on the node goes on.
    with websocket(
        a, path=f"/ws/main?since=2&epoch={epoch}", subprotocols=[JSON_SUBPROTOCOL]
    ) as client:
        welcome = event(client)
        assert (welcome["recovered"], "offset" in welcome) == (False, False)
        publisher.send(b"three\n")
        live = messages(client, 1)[0]
        assert (live["text"], "offset" in live) == ("three", False)
    # Redis is back (empty: no persistence): a new epoch, so the old one recovers nothing.
    redis_server.start()
    a.wait_count("backplane up", 2)
    b.wait_count("backplane up", 2)
    with websocket(
        b, path=f"/ws/main?since=2&epoch={epoch}", subprotocols=[JSON_SUBPROTOCOL]
    ) as client:
        welcome = event(client)
        assert welcome["recovered"] is False
        assert welcome["epoch"] != epoch
        publisher.send(b"four\n")
        live = messages(client, 1)[0]
        assert (live["text"], live["offset"], live["epoch"]) == ("four", 1, welcome["epoch"])
    assert admin_get(a, "/healthz") == (200, "ok\n")
    assert metric(admin_get(a, "/metrics")[1], "gateway_history_store_up", store="redis") == 1
    publisher.close()


def test_a_channel_that_stops_keeping_history_gets_a_new_epoch_in_redis(run_gateway, redis_server):
    a, b = node(run_gateway, redis_server, "gw-a"), node(run_gateway, redis_server, "gw-b")
    with websocket(b, subprotocols=[JSON_SUBPROTOCOL]) as client:
        epoch = event(client)["epoch"]
    publisher = Line(a.ports["tcp"])  # a peer on main at gw-a
    publisher.send(b"kept\n")
    with websocket(
        b, path=f"/ws/main?since=0&epoch={epoch}", subprotocols=[JSON_SUBPROTOCOL]
    ) as client:
        assert event(client)["recovered"] is True
        assert event(client)["text"] == "kept"
    # A reload on gw-a that keeps no history for main: what it publishes there now is not
    # kept, so Redis gives main a new epoch (no client may recover across it).
    text = a.config.read_text()
    a.config.write_text(text.replace("history = 2000", "history = 0"))
    a.proc.send_signal(signal.SIGHUP)
    a.wait_count("reload: applied", 1)
    with websocket(
        b, path=f"/ws/main?since=0&epoch={epoch}", subprotocols=[JSON_SUBPROTOCOL]
    ) as client:
        welcome = event(client)
        assert welcome["recovered"] is False
        assert welcome["epoch"] != epoch
    publisher.close()


def test_redis_killed_mid_flood_loses_nothing_locally(run_gateway, redis_server):
    a = node(run_gateway, redis_server, "gw-a")
    subscriber = Line(a.ports["json"])
    assert json_line(subscriber)["type"] == "welcome"  # on main, and subscribed now
    publisher = Line(a.ports["tcp"])
    publisher.send(b"n0\n")
    got = [json_line(subscriber)]  # the publisher is on main (its join came first)
    publisher.send(b"".join(b"n%d\n" % i for i in range(1, 5000)))
    redis_server.kill()  # with batches on their way to Redis, or numbered and not yet back
    publisher.send(b"".join(b"n%d\n" % i for i in range(5000, 6000)))
    got += [json_line(subscriber) for _ in range(5999)]
    assert [m["text"] for m in got] == [f"n{i}" for i in range(6000)]
    numbered = [m["offset"] for m in got if "offset" in m]
    assert numbered == list(range(1, len(numbered) + 1))  # a prefix, in order, once each
    assert numbered[:1] == [1] and "offset" not in got[-1]  # after the kill: unnumbered
    assert subscriber.nothing_within(0.3)
    subscriber.close()
    publisher.close()


def test_history_ttl_in_redis(run_gateway, redis_server):
    a, b = node(run_gateway, redis_server, "gw-a"), node(run_gateway, redis_server, "gw-b")
    sender, watcher = Line(a.ports["json"]), Line(a.ports["json"])
    json_line(sender)
    json_line(watcher)
    watcher.send(b'{"type":"subscribe","channel":"short.1"}\n')
    epoch = json_line(watcher)["epoch"]
    sender.send(b'{"type":"message","channel":"short.1","text":"old"}\n')
    assert json_line(watcher)["text"] == "old"
    time.sleep(0.7)  # older than history_ttl
    sender.send(b'{"type":"message","channel":"short.1","text":"new"}\n')
    assert json_line(watcher)["offset"] == 2  # numbered
    reader = Line(b.ports["json"])
    json_line(reader)
    reader.send(b'{"type":"subscribe","channel":"short.1"}\n')
    answer = json_line(reader)
    assert (answer["offset"], answer["epoch"]) == (2, epoch)
    assert json_line(reader)["text"] == "new"  # "old" is forgotten
    since = json.dumps({"offset": 0, "epoch": epoch}).encode()
    late = Line(b.ports["json"])
    json_line(late)
    late.send(b'{"type":"subscribe","channel":"short.1","since":%s}\n' % since)
    answer = json_line(late)  # offset 1 is no longer kept: it cannot be recovered
    assert (answer["type"], answer["recovered"]) == ("subscribed", False)
    assert json_line(late)["text"] == "new"
    for line in (sender, watcher, reader, late):
        line.close()
