"""The sqlite history store (docs/history.md): a real file in a temporary folder, the gateway
in memory (``MemoryGateway``, the clock moved by the test), and once a real thread pool.

A gateway stopped and a new one started on the same file is a restart: the same epochs go on
and a client recovers exactly what it missed."""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
import tomllib
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from gateway.config import ConfigError, HistorySettings, parse
from gateway.core.history import History
from gateway.core.message import Batch, Kind, Origin
from gateway.ops.admin import AdminSite
from gateway.stores.durable import (
    FLUSH_SECONDS,
    RETRY_SECONDS,
    DurableHistory,
    inline_runner,
)
from gateway.testing import MemoryGateway
from gateway.transports.listening import ListenError

CONFIG = """
[history]
store = "sqlite:{file}"

[channels.main]
history = 100

[channels."room.*"]
history = 5

[channels.brief]
history = 10
history_ttl = 10

[[listeners]]
name = "lines"
type = "tcp"
port = 8006
format = "json"

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
"""

ORIGIN = Origin("p-1", "l", "tcp")
NEXT_WRITE = 1.5 * FLUSH_SECONDS  # a little more: the clock's sums of 0.05 s steps round


def gateway(
    folder: Path, config: str = CONFIG, file: str = "history.db", start: bool = True
) -> MemoryGateway:
    return MemoryGateway(config.format(file=file), base=folder, start=start)


class Json:
    """A JSON-lines TCP client of the ``lines`` listener."""

    def __init__(self, gw: MemoryGateway) -> None:
        self.gw = gw
        self.connection = gw.connect("lines")

    def send(self, **request: Any) -> None:
        self.connection.send(json.dumps(request).encode() + b"\n")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.connection.lines()]

    def close(self) -> None:
        self.connection.close()


def publish(gw: MemoryGateway, *texts: str, channel: str = "main") -> None:
    gw.service.app_peer(channel=channel).publish(*texts)
    gw.flush()


def settle(gw: MemoryGateway) -> None:
    """Let the store's next write happen (it waits ``FLUSH_SECONDS`` for more to come)."""
    gw.advance(NEXT_WRITE)


def sent(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["text"], e["offset"]) for e in events if e["type"] == "message"]


def rows(path: Path, sql: str, *args: Any) -> list[Any]:
    """What another connection reads in the file now."""
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, args).fetchall()


def healthz(gw: MemoryGateway) -> tuple[int, str]:
    request = DummyRequest([b"healthz"])
    body = AdminSite(gw.service, gw.reactor).healthz(request)  # type: ignore[arg-type]
    return request.responseCode or 200, body.decode()


def test_a_restart_continues_the_epoch_and_a_client_recovers_exactly_what_it_missed(tmp_path):
    first = gateway(tmp_path)
    client = Json(first)
    client.send(type="subscribe", channel="room.1")
    events = client.events()
    epoch, room = events[0]["epoch"], events[-1]["epoch"]
    publish(first, "a", "b")
    publish(first, "r1", channel="room.1")
    assert sent(client.events()) == [("a", 1), ("b", 2), ("r1", 1)]
    client.close()
    publish(first, "c")
    publish(first, "d", "e")
    publish(first, "r2", "r3", channel="room.1")
    assert first.stop()

    second = gateway(tmp_path)  # the same file: a restart
    assert second.logged(r"history: 2 channels, 8 messages read back from .*history\.db")
    back = Json(second)
    welcome = back.events()[0]
    assert (welcome["epoch"], welcome["offset"]) == (epoch, 5)
    back.send(type="subscribe", channel="main", since={"offset": 2, "epoch": epoch}, id=1)
    back.send(type="subscribe", channel="room.1", since={"offset": 1, "epoch": room}, id=2)
    answer = back.events()
    assert sent(answer) == [("c", 3), ("d", 4), ("e", 5), ("r2", 2), ("r3", 3)]
    assert all(e["recovered"] for e in answer)
    assert [(e["channel"], e["offset"]) for e in answer if e["type"] == "subscribed"] == [
        ("main", 5),
        ("room.1", 3),
    ]
    publish(second, "live")
    assert sent(back.events()) == [("live", 6)]  # numbering goes on, nothing twice
    # The starting channel of a WebSocket, in its URL, across a second restart.
    assert second.stop()
    third = gateway(tmp_path)
    browser = third.websocket_connection("ws", f"/ws?since=4&epoch={epoch}", ["gateway.v1.json"])
    events = [json.loads(payload) for payload, _ in browser.client.take()]
    assert (events[0]["recovered"], events[0]["offset"]) == (True, 6)
    assert sent(events[1:]) == [("e", 5), ("live", 6)]
    assert [e["from"] for e in events[1:]] == ["app-4", "app-1"]  # who sent them, kept
    third.stop()


def test_the_file_keeps_each_channel_within_its_history_and_ttl(tmp_path):
    gw = gateway(tmp_path)
    path = tmp_path / "history.db"
    for i in range(20):
        publish(gw, f"r{i}", channel="room.1")  # history = 5: one run per batch
    settle(gw)
    assert rows(path, "SELECT first FROM runs WHERE channel = 'room.1' ORDER BY last") == [
        (16,),
        (17,),
        (18,),
        (19,),
        (20,),
    ]
    publish(gw, *[f"big{i}" for i in range(8)], channel="room.1")  # one run of 8: its last 5
    settle(gw)
    assert rows(path, "SELECT first, last FROM runs WHERE channel = 'room.1'") == [(24, 28)]
    publish(gw, "old", channel="brief")
    gw.advance(6)
    publish(gw, "newer", channel="brief")
    gw.advance(5)  # "old" is 11 s old: past history_ttl = 10
    publish(gw, "newest", channel="brief")
    settle(gw)
    assert rows(path, "SELECT first FROM runs WHERE channel = 'brief' ORDER BY last") == [
        (2,),
        (3,),
    ]
    assert rows(path, "SELECT name, last FROM channels ORDER BY name") == [
        ("brief", 3),
        ("room.1", 28),
    ]
    gw.stop()


def test_a_channel_sized_to_0_or_forgotten_starts_a_new_epoch_in_the_file_too(tmp_path):
    config = CONFIG.format(file="history.db")
    path = tmp_path / "history.db"
    gw = MemoryGateway(config, base=tmp_path)
    publish(gw, "a", "b")
    settle(gw)
    (before,) = rows(path, "SELECT epoch, last FROM channels WHERE name = 'main'")
    gw.reload(config.replace("history = 100", "history = 0"))
    settle(gw)
    assert rows(path, "SELECT * FROM channels WHERE name = 'main'") == []
    assert rows(path, "SELECT * FROM runs WHERE channel = 'main'") == []
    gw.reload(config)
    epoch = Json(gw).events()[0]["epoch"]
    assert epoch != before[0]
    settle(gw)
    assert rows(path, "SELECT epoch, last FROM channels WHERE name = 'main'") == [(epoch, 0)]
    gw.stop()
    again = MemoryGateway(config, base=tmp_path)
    welcome = Json(again).events()[0]
    assert (welcome["epoch"], welcome["offset"]) == (epoch, 0)
    again.stop()
    # Forgotten under max_channels: the oldest channel's log goes, in the file too.
    limited = config.replace("[[listeners]]", "[limits]\nmax_channels = 2\n\n[[listeners]]", 1)
    crowded = MemoryGateway(limited, base=tmp_path)
    publish(crowded, "x", channel="room.1")
    publish(crowded, "y", channel="room.2")
    settle(crowded)
    assert rows(path, "SELECT name FROM channels ORDER BY name") == [("room.1",), ("room.2",)]
    crowded.stop()


def test_what_is_recorded_until_the_next_write_is_one_transaction(tmp_path, monkeypatch):
    clock = Clock()
    history = History(lambda name: 50, clock=clock)
    store = DurableHistory(tmp_path / "h.db", history, clock, inline_runner())
    Deferred.fromCoroutine(store.open())
    writes: list[int] = []
    write = store.file.write

    def counted(runs: Any, *args: Any) -> None:
        writes.append(len(runs))
        write(runs, *args)

    monkeypatch.setattr(store.file, "write", counted)
    for i in range(10):
        history.record(Batch(ORIGIN, f"c{i % 3}", [b"m%d" % i]))
    clock.advance(0)
    assert writes == []  # nothing on the spot: the turn goes on, and the next ones
    clock.advance(NEXT_WRITE)
    assert writes == [10]
    history.record(Batch(ORIGIN, "c0", [b"next", b"one"]))
    clock.advance(NEXT_WRITE)
    assert writes == [10, 1]
    Deferred.fromCoroutine(store.close())
    assert rows(tmp_path / "h.db", "SELECT sum(last - first + 1) FROM runs") == [(12,)]


class ThreadedClock(Clock):
    """A clock that also takes results from threads, as a reactor does (``callFromThread``);
    ``run_until`` runs them on the test's thread, the "reactor thread"."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.from_threads.put((f, args))

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            f, args = self.from_threads.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args)
            self.advance(0)


def test_the_file_is_read_and_written_off_the_reactor_thread(tmp_path, monkeypatch):
    reactor = ThreadedClock()
    history = History(lambda name: 50, clock=reactor)
    store = DurableHistory(tmp_path / "h.db", history, reactor)  # its own thread pool
    threads: list[int] = []
    disk = threading.Event()  # the write waits for it: a slow disk
    for name in ("open", "write", "close"):
        work = getattr(store.file, name)

        def spy(*args: Any, work: Callable[..., Any] = work, name: str = name) -> Any:
            threads.append(threading.get_ident())
            if name == "write":
                assert disk.wait(10)
            return work(*args)

        monkeypatch.setattr(store.file, name, spy)
    opened = Deferred.fromCoroutine(store.open())
    reactor.run_until(lambda: opened.called)
    history.record(Batch(ORIGIN, "main", [b"hello"]))
    reactor.advance(NEXT_WRITE)  # hands the write over, returns while the disk is busy
    history.record(Batch(ORIGIN, "main", [b"again"]))
    assert history.position("main") is not None
    assert rows(tmp_path / "h.db", "SELECT count(*) FROM runs") == [(0,)]
    disk.set()
    closed = Deferred.fromCoroutine(store.close())
    reactor.run_until(lambda: closed.called)
    assert len(threads) == 4  # open, the write, the last one (with "again"), close
    assert threading.get_ident() not in threads
    assert len(set(threads)) == 1  # one thread: the file's writes stay in order
    assert rows(tmp_path / "h.db", "SELECT data FROM runs ORDER BY last") == [
        (b"hello",),
        (b"again",),
    ]


def test_before_the_reactor_runs_the_file_is_read_at_once(tmp_path):
    """``twistd`` binds privileged ports in ``privilegedStartService``, before the reactor
    runs: the file is read there and then, so the ports need not wait for a thread."""
    reactor = ThreadedClock()
    reactor.running = False  # type: ignore[attr-defined]
    store = DurableHistory(tmp_path / "h.db", History(lambda name: 5, clock=reactor), reactor)
    opened = Deferred.fromCoroutine(store.open())
    assert opened.called and store.file.connection is not None
    reactor.running = True  # type: ignore[attr-defined]
    closed = Deferred.fromCoroutine(store.close())
    reactor.run_until(lambda: closed.called)


def test_a_full_disk_leaves_live_delivery_alone_and_the_store_unhealthy(tmp_path):
    gw = gateway(tmp_path)
    store = gw.service.store
    assert store is not None and store.file.connection is not None
    assert healthz(gw) == (200, "ok\n")
    client = Json(gw)
    epoch = client.events()[0]["epoch"]
    publish(gw, "before")
    settle(gw)
    pages = store.file.connection.execute("PRAGMA page_count").fetchone()[0]
    store.file.connection.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    publish(gw, "x" * 20_000, "while full")
    settle(gw)
    assert [text[:5] for text, _ in sent(client.events())] == ["befor", "xxxxx", "while"]
    status, body = healthz(gw)
    assert status == 503
    assert body == "history: sqlite failing: database or disk is full\n"
    assert gw.logged(r"history: cannot write .*: database or disk is full; live delivery goes on")
    assert store.unwritten == 2
    publish(gw, "still full")  # tried again a second later, not at once
    assert sent(client.events()) == [("still full", 4)]
    store.file.connection.execute("PRAGMA max_page_count = 1000000")  # room again
    gw.advance(RETRY_SECONDS + FLUSH_SECONDS)
    assert healthz(gw)[0] == 200 and store.problem is None
    assert gw.logged(r"history: writing .* again")
    publish(gw, "after")
    gw.stop()
    # After a restart the numbering goes on from the last offset given, never again from 1
    # or from the last written; what the full disk lost cannot be recovered, and says so.
    again = gateway(tmp_path)
    late = Json(again)
    assert late.events()[0]["offset"] == 5
    late.send(type="subscribe", channel="main", since={"offset": 1, "epoch": epoch}, id=1)
    answer = late.events()
    assert answer[0]["recovered"] is False and sent(answer[1:]) == [("still full", 4), ("after", 5)]
    late.send(type="subscribe", channel="main", since={"offset": 4, "epoch": epoch}, id=2)
    assert sent(late.events()) == [("after", 5)]
    again.stop()


def test_the_runs_waiting_to_be_written_are_bounded(tmp_path):
    clock = Clock()
    history = History(lambda name: 1 if name == "last" else 100, clock=clock)
    held: list[Deferred[Any]] = []

    def stalled(work: Callable[[], Any]) -> Deferred[Any]:
        """Opens at once; then every write hangs (a disk that does not answer)."""
        if not held and store.file.connection is None:
            return inline_runner()(work)
        held.append(Deferred())
        return held[-1]

    store = DurableHistory(tmp_path / "h.db", history, clock, stalled, max_unwritten_bytes=1000)
    Deferred.fromCoroutine(store.open())
    history.record(Batch(ORIGIN, "main", [b"x" * 600]))
    clock.advance(NEXT_WRITE)
    assert len(held) == 1  # being written, and it does not finish
    history.record(Batch(ORIGIN, "main", [b"y" * 300]))
    history.record(Batch(ORIGIN, "main", [b"z" * 300, b"w"]))  # over 1000 bytes: left out
    clock.advance(NEXT_WRITE)
    assert (len(held), store.unwritten) == (1, 2)  # one write at a time
    position = history.position("main")
    assert position is not None and position[0] == 4  # numbered and delivered all the same
    # A channel that keeps only its last message: what it no longer keeps makes room.
    for text in (b"a" * 60, b"b" * 60, b"c" * 60):
        history.record(Batch(ORIGIN, "last", [text]))
    assert store.unwritten == 2
    held[0].callback(None)  # the disk answers: what waited goes in the next write
    clock.advance(NEXT_WRITE)
    assert len(held) == 2
    history.record(Batch(ORIGIN, "main", [b"v" * 600]))  # room again once it is written
    held[1].callback(None)
    clock.advance(NEXT_WRITE)
    assert (len(held), store.unwritten) == (3, 2)


def test_a_file_not_left_clean_continues_with_new_epochs_and_keeps_the_messages(tmp_path):
    gw = gateway(tmp_path)
    client = Json(gw)
    epoch = client.events()[0]["epoch"]
    publish(gw, "a", "b")
    settle(gw)
    # Killed: no last write, the file is not marked clean.
    killed = gw.service.store
    assert killed is not None and killed.file.connection is not None
    killed.file.connection.close()
    again = gateway(tmp_path)
    assert again.logged(r"was not left clean .* every channel continues with a new epoch")
    late = Json(again)
    welcome = late.events()
    assert welcome[0]["epoch"] != epoch and welcome[0]["offset"] == 2
    assert sent(welcome[1:]) == [("a", 1), ("b", 2)]  # still there for a plain replay
    late.send(type="subscribe", channel="main", since={"offset": 1, "epoch": epoch})
    assert late.events()[0]["recovered"] is False
    again.stop()
    gw.stop()


def test_a_broken_row_is_a_gap_not_a_wrong_message(tmp_path):
    gw = gateway(tmp_path)
    epoch = Json(gw).events()[0]["epoch"]
    publish(gw, "a")
    publish(gw, "b")
    publish(gw, "c")
    gw.stop()
    with closing(sqlite3.connect(tmp_path / "history.db")) as db, db:
        db.execute("UPDATE runs SET lengths = x'0500' WHERE channel = 'main' AND last = 2")
    again = gateway(tmp_path)
    late = Json(again)
    late.events()
    late.send(type="subscribe", channel="main", since={"offset": 2, "epoch": epoch})
    assert sent(late.events()) == [("c", 3)]
    late.send(type="subscribe", channel="main", since={"offset": 1, "epoch": epoch})
    assert late.events()[0]["recovered"] is False
    again.stop()


def test_kinds_origins_and_binary_payloads_come_back_as_they_were(tmp_path):
    clock = Clock()
    history = History(lambda name: 10, clock=clock)
    store = DurableHistory(tmp_path / "h.db", history, clock, inline_runner())
    Deferred.fromCoroutine(store.open())
    alice = Origin("ws-1:alice", "wss", "wss", "alice")
    history.record(Batch(alice, "main", [b"\xff\x00", b"text"], [Kind.BINARY, Kind.TEXT]))
    history.record(Batch(ORIGIN, "main", [b"", b"line"]))
    Deferred.fromCoroutine(store.close())
    restored = History(lambda name: 10, clock=clock)
    again = DurableHistory(tmp_path / "h.db", restored, clock, inline_runner())
    Deferred.fromCoroutine(again.open())
    (typed, untyped) = restored.replay("main")
    assert (typed.offset, list(typed.messages())) == (
        1,
        [(b"\xff\x00", Kind.BINARY), (b"text", Kind.TEXT)],
    )
    assert (typed.origin.peer_id, typed.origin.user, typed.origin.transport) == (
        "ws-1:alice",
        "alice",
        "wss",
    )
    assert (untyped.offset, untyped.kinds, list(untyped.payloads)) == (3, None, [b"", b"line"])
    Deferred.fromCoroutine(again.close())


def test_a_file_that_cannot_be_used_stops_the_start(tmp_path):
    for file, problem in [
        ("missing/history.db", r"cannot open .*missing/history\.db: no folder .*missing"),
        ("junk.db", r"cannot use .*junk\.db: file is not a database"),
    ]:
        (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
        gw = gateway(tmp_path, file=file, start=False)
        with pytest.raises(ListenError, match=r"^\[history\] store: " + problem):
            gw.start()
        gw.stop()
    with closing(sqlite3.connect(tmp_path / "later.db")) as db, db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema', '2')")
    gw = gateway(tmp_path, file="later.db", start=False)
    with pytest.raises(ListenError, match="has history schema 2; this gateway reads 1"):
        gw.start()
    gw.stop()


def settings(table: str, folder: Path) -> Any:
    text = f"{table}\n[[listeners]]\nname = 't'\ntype = 'tcp'\nport = 1\n"
    return parse(tomllib.loads(text), "<memory>", folder / "gateway.toml").history


def test_the_history_store_setting(tmp_path):
    assert settings("", tmp_path) == HistorySettings("memory", None)
    assert settings('[history]\nstore = "memory"', tmp_path) == HistorySettings("memory", None)
    sqlite = settings('[history]\nstore = "sqlite:data/h.db"', tmp_path)
    assert sqlite == HistorySettings("sqlite", tmp_path / "data" / "h.db")
    cluster = '[gateway]\nworkers = 2\n[cluster]\nredis = "redis://127.0.0.1"\n'
    redis = settings(cluster + '[history]\nstore = "redis"', tmp_path)
    assert redis == HistorySettings("redis", None)
    for table, problem in [
        (
            '[history]\nstore = "redis"',
            '"redis" keeps history in the [cluster] Redis: add a [cluster] table',
        ),
        ('[history]\nstore = "disk"', 'expected "memory", "sqlite:PATH" or "redis", got "disk"'),
        (
            '[history]\nstore = "sqlite"',
            'expected "memory", "sqlite:PATH" or "redis", got "sqlite"',
        ),
        ("[history]\nstore = 1", 'expected "memory", "sqlite:PATH" or "redis", got 1'),
        ('[history]\nstore = "sqlite: "', 'expected a file path after "sqlite:", got an empty one'),
        ("[history]\nsize = 1", "unknown key; known keys: store"),
        (
            '[gateway]\nworkers = 2\n[cluster]\nredis = "redis://127.0.0.1"\n'
            '[history]\nstore = "sqlite:h.db"',
            "an sqlite file belongs to one process: it cannot serve 2 workers (gateway.workers)",
        ),
    ]:
        with pytest.raises(ConfigError) as error:
            settings(table, tmp_path)
        key = "history.size" if "size" in table else "history.store"
        assert str(error.value) in (f"<memory>: {key}: {problem}", f"<memory>: {problem}")


def test_changing_the_store_needs_a_restart(tmp_path):
    gw = gateway(tmp_path)
    assert gw.reload(CONFIG.format(file="other.db")) == ["[history]"]
    assert gw.service.config.history.path == tmp_path / "history.db"
    gw.stop()
