"""Offsets, epochs and recovery (docs/history.md), in memory: every JSON transport numbers the
messages of a channel that keeps history and recovers what a client missed; raw peers are as
they were; the store itself is checked against a model."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gateway.config import ConfigError
from gateway.core.history import History
from gateway.core.message import Batch, Kind, Origin
from gateway.testing import MemoryGateway
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL

CONFIG = """
[channels.main]
history = 2000

[channels."room.*"]
history = 5

[channels.brief]
history = 3
history_ttl = 10

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
name = "secure"
type = "tls"
port = 8008
format = "json"
cert = "{certs}/server.pem"
key = "{certs}/server.key"
generate_dev_cert = true

[[listeners]]
name = "udp"
type = "udp"
port = 8009
format = "json"

[[listeners]]
name = "rawudp"
type = "udp"
port = 8010

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""

JSON_TRANSPORTS = ["lines", "secure", "udp", "ws"]
_SOURCES = (("127.0.0.1", port) for port in itertools.count(50000))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")  # made once, by the first gateway


def gateway(certs: Path, config: str = CONFIG) -> MemoryGateway:
    return MemoryGateway(config.format(certs=certs), base=certs)


@pytest.fixture
def gw(certs: Path) -> Iterator[MemoryGateway]:
    gateway_ = gateway(certs)
    yield gateway_
    gateway_.stop()


class Client:
    """A JSON client of one transport: JSON lines (tcp, tls), datagrams (udp), frames (ws)."""

    def __init__(self, gw: MemoryGateway, listener: str, path: str = "/ws") -> None:
        self.gw = gw
        self.listener = listener
        if listener == "udp":
            self.port = gw.datagrams("udp")
            self.source = next(_SOURCES)
            self.port.send(b"\n", self.source)  # joins
        elif listener == "ws":
            self.connection = gw.websocket_connection("ws", path, [JSON_SUBPROTOCOL])
        else:
            self.connection = gw.connect(listener)

    def send(self, **request: Any) -> None:
        data = json.dumps(request).encode()
        if self.listener == "udp":
            self.port.send(data, self.source)
        elif self.listener == "ws":
            self.connection.client.sendMessage(data)
            self.gw.flush()
        else:
            self.connection.send(data + b"\n")

    def events(self) -> list[dict[str, Any]]:
        """The events received since the last call."""
        if self.listener == "udp":
            return [json.loads(datagram) for datagram in self.port.received(self.source)]
        if self.listener == "ws":
            return [json.loads(payload) for payload, _ in self.connection.client.take()]
        return [json.loads(line) for line in self.connection.lines()]

    def messages(self) -> list[dict[str, Any]]:
        return [event for event in self.events() if event["type"] == "message"]

    def close(self) -> None:
        if self.listener != "udp":  # a UDP client just goes quiet (its address is not reused)
            self.connection.close()


def publish(gw: MemoryGateway, *texts: str, channel: str = "main") -> None:
    gw.service.app_peer(channel=channel).publish(*texts)
    gw.flush()


def sent(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["text"], e["offset"]) for e in events if e["type"] == "message"]


@pytest.mark.parametrize("listener", JSON_TRANSPORTS)
def test_json_clients_see_offsets_and_the_epoch_on_every_transport(gw, listener):
    client = Client(gw, listener)
    welcome = client.events()[0]
    epoch = welcome["epoch"]
    assert (welcome["type"], welcome["channel"], welcome["offset"]) == ("welcome", "main", 0)
    gw.connect("raw").send(b"a\nb\n")
    publish(gw, "c")
    messages = client.messages()
    assert [(e["text"], e["offset"], e["epoch"]) for e in messages] == [
        ("a", 1, epoch),
        ("b", 2, epoch),
        ("c", 3, epoch),
    ]
    assert not any("recovered" in e or "history" in e for e in messages)
    client.send(type="subscribe", channel="room.1", id=1)
    subscribed = client.events()[-1]
    assert subscribed["type"] == "subscribed" and subscribed["offset"] == 0
    assert subscribed["epoch"] != epoch  # each channel has its own
    # A channel that keeps no history: no numbers, anywhere.
    client.send(type="subscribe", channel="plain", id=2)
    assert client.events()[-1] == {"type": "subscribed", "channel": "plain", "id": 2}
    publish(gw, "x", channel="plain")
    (message,) = client.messages()
    assert "offset" not in message and "epoch" not in message


@pytest.mark.parametrize("listener", JSON_TRANSPORTS)
def test_a_client_recovers_what_it_missed_then_live_messages_follow(gw, listener):
    first = Client(gw, listener)
    first.send(type="subscribe", channel="room.1")
    publish(gw, "a", "b", channel="room.1")
    events = first.events()
    last = events[-1]
    assert (last["text"], last["offset"]) == ("b", 2)
    first.close()
    publish(gw, "c", channel="room.1")
    publish(gw, "d", "e", channel="room.1")
    again = Client(gw, listener)
    again.events()
    again.send(
        type="subscribe", channel="room.1", since={"offset": 2, "epoch": last["epoch"]}, id=7
    )
    answer = again.events()
    assert sent(answer) == [("c", 3), ("d", 4), ("e", 5)]
    assert all(e["recovered"] is True and "history" not in e for e in answer[:-1])
    assert answer[-1] == {
        "type": "subscribed",
        "channel": "room.1",
        "recovered": True,
        "offset": 5,
        "epoch": last["epoch"],
        "id": 7,
    }
    publish(gw, "f", channel="room.1")
    (live,) = again.messages()
    assert (live["text"], live["offset"]) == ("f", 6) and "recovered" not in live


def test_a_websocket_url_recovers_the_starting_channel(gw):
    browser = Client(gw, "ws", "/ws/room.2")
    epoch = browser.events()[0]["epoch"]
    publish(gw, "a", channel="room.2")
    assert sent(browser.events()) == [("a", 1)]
    browser.close()
    publish(gw, "b", "c", channel="room.2")
    back = Client(gw, "ws", f"/ws/room.2?since=1&epoch={epoch}")
    events = back.events()
    welcome = events[0]
    assert (welcome["type"], welcome["channel"], welcome["recovered"]) == (
        "welcome",
        "room.2",
        True,
    )
    assert (welcome["offset"], welcome["epoch"]) == (3, epoch)
    assert sent(events[1:]) == [("b", 2), ("c", 3)]
    assert all(e["recovered"] for e in events[1:])
    # On the listener's own channel (/ws), too; and a place not kept is no recovery.
    publish(gw, *[f"m{i}" for i in range(3)])
    main_epoch = Client(gw, "ws").events()[0]["epoch"]
    resumed = Client(gw, "ws", f"/ws?since=1&epoch={main_epoch}").events()
    assert resumed[0]["recovered"] is True and sent(resumed[1:]) == [("m1", 2), ("m2", 3)]
    stale = Client(gw, "ws", "/ws/room.2?since=1&epoch=elsewhere").events()
    assert stale[0]["recovered"] is False
    assert [(e["text"], e["history"]) for e in stale[1:]] == [("a", True), ("b", True), ("c", True)]


@pytest.mark.parametrize("how", ["websocket url", "subscribe"])
def test_a_client_that_misses_1000_messages_recovers_each_once_in_order(certs, how):
    gw = gateway(certs, CONFIG + "\n[channels.big]\nhistory = 2000\n")
    try:
        if how == "websocket url":
            channel, client = "main", Client(gw, "ws")
        else:
            channel, client = "big", Client(gw, "lines")
            client.send(type="subscribe", channel="big")
        epoch = client.events()[-1]["epoch"]  # of the welcome, or of the subscribed event
        raw, app = gw.connect("raw"), gw.service.app_peer(channel=channel)
        sizes = itertools.cycle([1, 7, 3, 64, 1, 29])

        def publish_all(texts: list[str]) -> None:  # in batches of many sizes, from two peers
            while texts:
                size = next(sizes)
                batch, texts = texts[:size], texts[size:]
                if channel == "main" and size % 2:
                    raw.send(b"".join(text.encode() + b"\n" for text in batch))
                else:
                    app.publish(*batch)
            gw.flush()

        publish_all([f"seen {i}" for i in range(10)])
        assert [e["offset"] for e in client.messages()] == list(range(1, 11))
        client.close()
        missed = [f"missed {i}" for i in range(1000)]
        publish_all(missed)
        if how == "websocket url":
            back = Client(gw, "ws", f"/ws?since=10&epoch={epoch}")
            events = back.events()
            assert (events[0]["type"], events[0]["recovered"]) == ("welcome", True)
            recovered = events[1:]
        else:
            back = Client(gw, "lines")
            back.events()
            back.send(type="subscribe", channel="big", since={"offset": 10, "epoch": epoch})
            events = back.events()
            assert (events[-1]["type"], events[-1]["recovered"]) == ("subscribed", True)
            recovered = events[:-1]
        assert [(e["text"], e["offset"]) for e in recovered] == [
            (text, 11 + i) for i, text in enumerate(missed)
        ]
        assert all(e["recovered"] and e["epoch"] == epoch for e in recovered)
        app.publish("live")
        gw.flush()
        assert sent(back.messages()) == [("live", 1011)]
    finally:
        gw.stop()


@pytest.mark.parametrize("listener", ["lines", "udp"])
def test_a_gap_is_told_then_the_last_messages_replay(gw, listener):
    watcher = Client(gw, listener)
    watcher.send(type="subscribe", channel="room.1")
    epoch = watcher.events()[-1]["epoch"]
    publish(gw, *[f"m{i}" for i in range(1, 11)], channel="room.1")  # offsets 1-10; 6-10 kept
    client = Client(gw, listener)
    client.events()
    client.send(type="subscribe", channel="room.1", since={"offset": 4, "epoch": epoch}, id="g")
    answer = client.events()
    assert answer[0] == {
        "type": "subscribed",
        "channel": "room.1",
        "recovered": False,
        "offset": 10,
        "epoch": epoch,
        "id": "g",
    }
    assert sent(answer[1:]) == [(f"m{i}", i) for i in range(6, 11)]
    assert all(e["history"] is True and "recovered" not in e for e in answer[1:])
    # Right after the last kept one before the gap: nothing is missing, so it recovers.
    client.send(type="subscribe", channel="room.1", since={"offset": 5, "epoch": epoch})
    answer = client.events()
    assert sent(answer) == [(f"m{i}", i) for i in range(6, 11)]
    assert answer[-1]["recovered"] is True


def test_another_epoch_or_an_offset_never_given_is_no_recovery(gw):
    client = Client(gw, "lines")
    client.send(type="subscribe", channel="room.1")
    epoch = client.events()[-1]["epoch"]
    publish(gw, "a", "b", channel="room.1")
    for since in ({"offset": 1, "epoch": "another"}, {"offset": 3, "epoch": epoch}):
        other = Client(gw, "lines")
        other.events()
        other.send(type="subscribe", channel="room.1", since=since)
        answer = other.events()
        assert (answer[0]["type"], answer[0]["recovered"]) == ("subscribed", False)
        assert [(e["text"], e["history"]) for e in answer[1:]] == [("a", True), ("b", True)]
    # Up to date: recovered, nothing to send.
    other.send(type="subscribe", channel="room.1", since={"offset": 2, "epoch": epoch})
    assert [(e["type"], e["recovered"]) for e in other.events()] == [("subscribed", True)]
    # A channel that keeps no history cannot recover.
    other.send(type="subscribe", channel="plain", since={"offset": 0, "epoch": epoch})
    assert other.events() == [{"type": "subscribed", "channel": "plain", "recovered": False}]


def test_history_ttl_forgets_old_messages_on_the_gateway_clock(gw):
    client = Client(gw, "lines")
    client.send(type="subscribe", channel="brief")
    epoch = client.events()[-1]["epoch"]
    publish(gw, "old", channel="brief")
    gw.reactor.advance(6)
    publish(gw, "newer", channel="brief")
    gw.reactor.advance(5)  # "old" is 11 s old, over history_ttl = 10; "newer" 5 s

    def resume(offset: int) -> list[dict[str, Any]]:
        late = Client(gw, "lines")
        late.events()
        late.send(type="subscribe", channel="brief", since={"offset": offset, "epoch": epoch})
        return late.events()

    answer = resume(0)
    assert answer[0]["recovered"] is False and sent(answer[1:]) == [("newer", 2)]
    answer = resume(1)
    assert sent(answer) == [("newer", 2)] and answer[-1]["recovered"] is True
    gw.reactor.advance(5)
    answer = resume(1)
    assert len(answer) == 1 and answer[0]["recovered"] is False  # nothing left to replay
    assert resume(2)[-1]["recovered"] is True  # it had everything
    # The numbering goes on.
    publish(gw, "next", channel="brief")
    assert sent(client.messages()) == [("old", 1), ("newer", 2), ("next", 3)]


def test_the_epoch_changes_when_the_history_is_lost(certs):
    first = gateway(certs)
    epoch = Client(first, "lines").events()[0]["epoch"]
    publish(first, "a", "b")
    first.stop()
    restarted = gateway(certs)  # a restart: the memory store starts again
    client = Client(restarted, "lines")
    welcome = client.events()[0]
    assert welcome["epoch"] != epoch and welcome["offset"] == 0
    client.send(type="subscribe", channel="main", since={"offset": 2, "epoch": epoch})
    assert client.events()[0]["recovered"] is False
    publish(restarted, "x")
    assert sent(client.messages()) == [("x", 1)]
    # A reload that keeps history (another size) keeps the epoch and the numbering ...
    config = CONFIG.format(certs=certs)
    restarted.reload(config.replace("history = 2000", "history = 10"))
    late = Client(restarted, "lines").events()
    assert late[0]["epoch"] == welcome["epoch"] and sent(late[1:]) == [("x", 1)]
    # ... one that drops it starts a new epoch once it keeps history again.
    restarted.reload(config.replace("history = 2000", "history = 0"))
    assert "epoch" not in Client(restarted, "lines").events()[0]
    restarted.reload(config)
    again = Client(restarted, "lines").events()
    assert again[0]["epoch"] not in (epoch, welcome["epoch"]) and again[0]["offset"] == 0
    assert len(again) == 1  # nothing kept from before
    restarted.stop()


def test_a_channel_forgotten_under_max_channels_starts_a_new_epoch():
    history = History(lambda name: 2, max_channels=2)
    origin = Origin("p", "l", "tcp")
    history.record(Batch(origin, "a", [b"1"]))
    before = history.position("a")
    history.record(Batch(origin, "b", [b"1"]))
    history.record(Batch(origin, "c", [b"1"]))  # "a", the oldest, is forgotten
    after = history.position("a")
    assert before is not None and after is not None
    assert before[0] == 1 and after[0] == 0 and after[1] != before[1]


@pytest.mark.parametrize(
    "since",
    [
        "17",
        17,
        None,
        [17, "e"],
        {"epoch": "e"},
        {"offset": -1, "epoch": "e"},
        {"offset": "17", "epoch": "e"},
        {"offset": True, "epoch": "e"},
        {"offset": 1.5, "epoch": "e"},
        {"offset": 17},
        {"offset": 17, "epoch": 5},
    ],
)
def test_a_bad_since_is_a_bad_request_and_the_client_stays(gw, since):
    client = Client(gw, "lines")
    client.events()
    client.send(type="subscribe", channel="room.1", since=since, id=3)
    (error,) = client.events()
    assert (error["type"], error["code"], error["id"]) == ("error", "bad_request", 3)
    assert "room.1" not in gw.bus.subscriptions(client.connection.peer)
    client.send(type="subscribe", channel="room.1", id=4)
    assert client.events()[0]["id"] == 4


def test_since_on_a_pattern_is_a_bad_request(gw):
    client = Client(gw, "ws")
    client.events()
    client.send(type="subscribe", channel="room.*", since={"offset": 0, "epoch": "e"}, id=1)
    assert [(e["type"], e["code"], e["id"]) for e in client.events()] == [
        ("error", "bad_request", 1)
    ]


@pytest.mark.parametrize("query", ["since=x&epoch=e", "since=3", "epoch=e", "since=-1&epoch=e"])
def test_a_bad_since_in_a_websocket_url_is_refused(gw, query):
    request = (
        f"GET /ws/room.1?{query} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: gateway.v1.json\r\n\r\n"
    )
    reply = gw.http("ws", request.encode()).value()
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"400"


def test_raw_peers_are_as_before(gw):
    publish(gw, "a", "b")
    gw.connect("raw").send(b"c\n")
    assert gw.connect("raw").lines() == [b"a", b"b", b"c"]  # the last N, no offsets
    plain = gw.websocket("ws", path="/ws?since=1&epoch=anything")  # raw: the query is ignored
    assert plain.texts() == ["a", "b", "c"]
    udp = gw.datagrams("rawudp")
    udp.send(b"\n", ("127.0.0.1", 40000))
    assert udp.received(("127.0.0.1", 40000)) == [b"a\n", b"b\n", b"c\n"]
    publish(gw, "d")
    assert plain.texts()[-1] == "d" and udp.received(("127.0.0.1", 40000)) == [b"d\n"]


def test_a_tcp_json_client_may_resume_its_starting_channel(gw):
    client = Client(gw, "lines")
    epoch = client.events()[0]["epoch"]
    publish(gw, "a", "b")
    client.close()
    publish(gw, "c")
    back = Client(gw, "lines")
    joined = back.events()  # its welcome, and the last messages with their offsets
    assert sent(joined[1:]) == [("a", 1), ("b", 2), ("c", 3)]
    back.send(type="subscribe", channel="main", since={"offset": 2, "epoch": epoch})
    answer = back.events()  # subscribed already; what it asks for all the same
    assert sent(answer) == [("c", 3)] and answer[-1]["recovered"] is True


def test_messages_from_other_nodes_are_numbered_here(certs):
    gw = MemoryGateway(CONFIG.format(certs=certs), base=certs, backplane=True)
    assert gw.backplane is not None
    client = Client(gw, "ws")
    client.events()
    gw.backplane.remote_message(b"from afar")
    publish(gw, "from here")
    assert sent(client.messages()) == [("from afar", 1), ("from here", 2)]
    gw.stop()


def test_history_ttl_is_validated():
    def load(table: str) -> Any:
        return MemoryGateway(f"{table}\n[[listeners]]\nname = 't'\ntype = 'tcp'\nport = 1\n")

    gw = load('[channels."room.*"]\nhistory = 3\nhistory_ttl = 2.5\n')
    assert gw.service.config.channel("room.1").history_ttl == 2.5
    assert gw.service.config.channel("main").history_ttl == 0.0
    gw.stop()
    for value, problem in [
        ("0", "expected a number of seconds above 0, got 0"),
        ("-1", "expected a number of seconds above 0, got -1"),
        ('"10"', 'expected a number of seconds above 0, got "10"'),
        ("true", "expected a number of seconds above 0, got true"),
        ("inf", "expected a number of seconds above 0, got inf"),
    ]:
        with pytest.raises(ConfigError) as error:
            load(f"[channels.main]\nhistory = 3\nhistory_ttl = {value}\n")
        assert str(error.value) == f"<memory>: channels.main.history_ttl: {problem}"
    with pytest.raises(ConfigError) as error:
        load("[channels.main]\nhistory_ttl = 5\n")
    assert str(error.value) == "<memory>: channels.main.history_ttl: needs history above 0"


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("wait"), st.sampled_from([0.5, 2.0, 4.0])),
        st.tuples(st.just("since"), st.integers(0, 80), st.booleans()),
        st.tuples(st.just("resize"), st.integers(0, 9)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9), st.sampled_from([0.0, 5.0]), OPERATIONS)
# A run partly forgotten, then more room: what was forgotten stays forgotten.
@example(5, 0.0, [("record", 4, False), ("record", 2, True), ("resize", 9), ("since", 0, True)])
def test_the_store_gives_exactly_the_kept_messages_after_an_offset(size, ttl, operations):
    """Against a model: every message numbered one more than the last; ``since`` gives
    exactly the messages after the offset when none of them is forgotten (the last
    ``size``, younger than ``ttl``), else None; a new epoch exactly when history is lost."""
    clock = Clock()
    sizes = {"c": size}
    history = History(lambda name: sizes[name], ttl_of=lambda name: ttl, clock=clock)
    origin = Origin("p", "l", "tcp")
    counter = itertools.count()
    kept: list[tuple[int, bytes, float]] = []  # the model: (offset, payload, recorded at)
    last = 0
    position = history.position("c")
    assert position is not None
    epoch = position[1]

    def unexpired() -> list[tuple[int, bytes, float]]:
        now = clock.seconds()
        return [m for m in kept if not ttl or m[2] > now - ttl]

    for operation in operations:
        if operation[0] == "record":
            _, count, typed = operation
            payloads = [b"m%d" % next(counter) for _ in range(count)]
            batch = Batch(origin, "c", payloads, [Kind.TEXT] * count if typed else None)
            history.record(batch)
            if not sizes["c"]:
                assert (batch.offset, batch.epoch) == (0, None)  # no history, no numbers
                continue
            assert (batch.offset, batch.epoch) == (last + 1, epoch)
            now = clock.seconds()
            kept += [(last + 1 + i, payload, now) for i, payload in enumerate(payloads)]
            kept = kept[-sizes["c"] :]
            last += count
        elif operation[0] == "wait":
            clock.advance(operation[1])
        elif operation[0] == "resize":
            before = sizes["c"]
            sizes["c"] = operation[1]
            history.resize()
            if not sizes["c"]:
                kept, last = [], 0
            elif not before:
                position = history.position("c")
                assert position is not None and position[1] != epoch
                epoch = position[1]
            else:
                kept = kept[-sizes["c"] :]
        elif sizes["c"]:
            _, offset, same_epoch = operation
            got = history.since("c", offset, epoch if same_epoch else "other")
            messages = unexpired()
            first_kept = messages[0][0] if messages else last + 1
            if not same_epoch or offset > last or offset + 1 < first_kept:
                assert got is None
            else:
                assert got is not None
                flat = [
                    (batch.offset + i, payload, kind)
                    for batch in got
                    for i, (payload, kind) in enumerate(batch.messages())
                ]
                assert [(o, p) for o, p, _ in flat] == [
                    (o, p) for o, p, _ in messages if o > offset
                ]
                assert all(kind is Kind.TEXT for _, _, kind in flat)
                assert all(batch.recovered and batch.epoch == epoch for batch in got)
            replayed = [p for batch in history.replay("c") for p in batch.payloads]
            assert replayed == [p for _, p, _ in messages]
        if sizes["c"]:
            assert history.position("c") == (last, epoch)
