"""Recovery against the real gateway: a WebSocket JSON client (the ``websockets`` library)
leaves, misses messages, and comes back with ``/ws/main?since=N&epoch=E`` — on the same
gateway, and across a restart with the sqlite store; the store failing while running."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from tests.conftest import (
    GATEWAY,
    JSON_SUBPROTOCOL,
    TIMEOUT,
    GatewayProcess,
    Line,
    admin_get,
    metric,
    websocket,
)
from tests.toml import toml_listener, toml_table

CONFIG = (
    toml_table("channels.main", history=100)
    + toml_listener("tcp")
    + toml_listener("ws", ping_interval=0)
)


def next_event(client: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(client.recv(timeout=TIMEOUT))
    return event


def test_a_websocket_client_reconnects_with_since_and_gets_exactly_what_it_missed(run_gateway):
    gw = run_gateway(CONFIG)
    publisher = Line(gw.ports["tcp"])
    with websocket(gw, subprotocols=[JSON_SUBPROTOCOL]) as client:
        welcome = next_event(client)
        epoch = welcome["epoch"]
        publisher.send(b"one\ntwo\n")
        seen = [next_event(client) for _ in range(2)]
    assert [(e["text"], e["offset"], e["epoch"]) for e in seen] == [
        ("one", 1, epoch),
        ("two", 2, epoch),
    ]
    publisher.send(b"three\nfour\n")
    publisher.send(b"five\n")
    # The publisher's own line after the others: once it is seen live, all were recorded.
    with websocket(gw, subprotocols=[JSON_SUBPROTOCOL]) as witness:
        next_event(witness)
        while next_event(witness)["text"] != "five":
            pass
    path = f"/ws/main?since=2&epoch={epoch}"
    with websocket(gw, path=path, subprotocols=[JSON_SUBPROTOCOL]) as client:
        welcome = next_event(client)
        assert (welcome["type"], welcome["recovered"], welcome["offset"]) == ("welcome", True, 5)
        missed = [next_event(client) for _ in range(3)]
        assert [(e["text"], e["offset"], e["recovered"]) for e in missed] == [
            ("three", 3, True),
            ("four", 4, True),
            ("five", 5, True),
        ]
        publisher.send(b"six\n")
        live = next_event(client)
        assert (live["text"], live["offset"], "recovered" in live) == ("six", 6, False)
    publisher.close()


SQLITE = toml_table("history", store="sqlite:history.db") + toml_table("admin", port=0) + CONFIG


def restart(gw: GatewayProcess) -> GatewayProcess:
    """Stop ``gw`` as an operator would (SIGTERM), and start it again on the same file."""
    assert gw.stop() == 0
    again = GatewayProcess(gw.config)
    try:
        again.wait_listening(3)
    except BaseException:
        again.stop()
        raise
    return again


def read_up_to(gw: GatewayProcess, text: str) -> None:
    """A fresh JSON client reads the channel until ``text``: all before it was recorded."""
    with websocket(gw, subprotocols=[JSON_SUBPROTOCOL]) as witness:
        next_event(witness)
        while next_event(witness).get("text") != text:
            pass


def test_an_sqlite_history_survives_a_restart_and_the_client_recovers_across_it(run_gateway):
    gw = run_gateway(SQLITE, listeners=3)
    assert admin_get(gw, "/healthz") == (200, "ok\n")
    publisher = Line(gw.ports["tcp"])
    with websocket(gw, subprotocols=[JSON_SUBPROTOCOL]) as client:
        epoch = next_event(client)["epoch"]
        publisher.send(b"one\ntwo\n")
        assert [next_event(client)["text"] for _ in range(2)] == ["one", "two"]
    publisher.send(b"three\nfour\n")  # the client is gone: it does not read these
    publisher.send(b"five\n")
    read_up_to(gw, "five")
    publisher.close()
    gw = restart(gw)
    try:
        gw.wait_for(r"history: 1 channels, 5 messages read back from \S+history\.db")
        publisher = Line(gw.ports["tcp"])
        path = f"/ws/main?since=2&epoch={epoch}"
        with websocket(gw, path=path, subprotocols=[JSON_SUBPROTOCOL]) as client:
            welcome = next_event(client)
            assert (welcome["recovered"], welcome["offset"], welcome["epoch"]) == (True, 5, epoch)
            missed = [next_event(client) for _ in range(3)]
            assert [(e["text"], e["offset"], e["recovered"]) for e in missed] == [
                ("three", 3, True),
                ("four", 4, True),
                ("five", 5, True),
            ]
            publisher.send(b"six\n")
            live = next_event(client)
            assert (live["text"], live["offset"], "recovered" in live) == ("six", 6, False)
            publisher.close()
    finally:
        gw.stop()


def written(database: Path, query: str, expected: list[Any]) -> None:
    """Wait until another reader of ``database`` sees ``expected`` (the gateway's writes
    are on a thread of their own)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with closing(sqlite3.connect(database)) as db:
            if db.execute(query).fetchall() == expected:
                return
        assert time.monotonic() < deadline, f"{query} never gave {expected}"
        time.sleep(0.02)


def test_a_history_file_removed_while_running_is_reported_and_delivery_goes_on(run_gateway):
    gw = run_gateway(SQLITE, listeners=3)
    database = gw.config.parent / "history.db"
    publisher, reader = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    publisher.send(b"kept\n")
    assert reader.line() == b"kept"
    written(database, "SELECT count(*) FROM runs", [(1,)])
    for path in database.parent.glob("history.db*"):
        path.unlink()
    publisher.send(b"after\n")
    assert reader.line() == b"after"  # live delivery goes on
    gw.wait_for(r"history: cannot write \S+history\.db: .*No such file")
    status, body = admin_get(gw, "/healthz")
    assert status == 503
    assert body.startswith("history: sqlite failing: ") and "No such file" in body
    metrics = admin_get(gw, "/metrics")[1]
    assert metric(metrics, "gateway_history_store_up", store="sqlite") == 0
    assert metric(metrics, "gateway_history_unwritten_total") == 1
    publisher.send(b"still\n")
    assert reader.line() == b"still"
    publisher.close()
    reader.close()


def test_a_history_file_that_cannot_be_opened_stops_the_start_with_status_1(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(toml_table("history", store="sqlite:no/such/folder/h.db") + CONFIG)
    done = subprocess.run(
        [*GATEWAY, "--config", str(config)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 1
    assert f"gateway: [history] store: cannot open {tmp_path}/no/such/folder/h.db" in done.stderr
    config.write_text(toml_table("history", store="redis") + CONFIG)
    done = subprocess.run(
        [*GATEWAY, "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(
        f'{config}: history.store: "redis" keeps history in the [cluster] Redis: add a '
        "[cluster] table"
    )
