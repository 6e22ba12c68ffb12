"""Recovery against the real gateway: a WebSocket JSON client (the ``websockets`` library)
leaves, misses messages, and comes back with ``/ws/main?since=N&epoch=E``."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import JSON_SUBPROTOCOL, TIMEOUT, Line, toml_listener, toml_table, websocket

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
