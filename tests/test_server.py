"""The whole gateway in process (``gateway.testing``): reload on every listener type,
the drain, caps over mixed transports, history and presence."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.tls.pki import fingerprint
from gateway.transports.websocket.envelope import JSON_SUBPROTOCOL
from tests.conftest import StartMemory


@pytest.fixture
def start(memory_gateways: StartMemory) -> StartMemory:
    return memory_gateways


def every_type(tmp_path: Path, **keys: str) -> str:
    """All five listener types; ``keys`` adds lines to listeners by name."""
    tls = f'cert = "{tmp_path}/server.pem"\nkey = "{tmp_path}/server.key"\ngenerate_dev_cert = true'
    tables = {
        "tcp": 'type = "tcp"\nport = 8006',
        "tls": f'type = "tls"\nport = 8007\n{tls}',
        "udp": 'type = "udp"\nport = 8008',
        "ws": 'type = "ws"\nport = 8080\nping_interval = 0',
        "wss": f'type = "wss"\nport = 8443\nping_interval = 0\n{tls}',
    }
    return "\n".join(
        f'[[listeners]]\nname = "{name}"\n{body}\n{keys.get(name, "")}\n'
        for name, body in tables.items()
    )


# Reload


def test_reload_reaches_the_welcome_of_every_stream_listener(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path)
    welcomed = {
        name: f'welcome = "{name} welcomes {{peer}}"' for name in ("tcp", "tls", "ws", "wss")
    }
    restart = gw.reload(every_type(tmp_path, **welcomed))
    assert restart == []
    assert gw.connect("tcp").lines() == [b"tcp welcomes tcp-1"]
    assert gw.connect("tls").lines() == [b"tls welcomes tls-1"]
    assert gw.websocket("ws").texts() == ["ws welcomes ws-1"]
    assert gw.websocket("wss").texts() == ["wss welcomes wss-1"]


def test_reload_reaches_the_udp_allow_list_and_challenge(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path)
    udp = gw.datagrams("udp")
    udp.send(b"hello\n", source=("127.0.0.1", 5000))
    assert gw.bus.peer_count == 1
    gw.reload(every_type(tmp_path, udp='allow = ["10.0.0.0/8"]'))
    udp.send(b"again\n", source=("127.0.0.1", 5001))
    assert gw.bus.peer_count == 1  # loopback is no longer allowed for new sources
    assert gw.bus.metrics.dropped["udp_not_allowed"] == 1
    gw.reload(every_type(tmp_path, udp="challenge = true"))
    udp.send(b"unverified\n", source=("127.0.0.1", 5002))
    assert gw.bus.metrics.dropped["udp_unverified"] == 1


def test_reload_reaches_the_limits_of_every_transport(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path)
    gw.reload("[limits]\nmax_message_bytes = 8\n" + every_type(tmp_path))
    line = gw.connect("tcp")
    line.send(b"123456789\n")
    assert line.closed
    secure = gw.connect("tls")
    secure.send(b"123456789\n")
    assert secure.closed
    web = gw.websocket("ws")
    web.sendMessage(b"123456789")
    gw.flush()
    assert web.closed is not None and web.closed[1] == 1009
    gw.datagrams("udp").send(b"123456789")
    assert gw.bus.metrics.dropped["oversize"] == 4


def test_reload_reaches_the_certificates_of_tls_and_wss(start, tmp_path):
    from cryptography import x509

    from gateway.tls.devcerts import ensure_dev_server_cert

    gw = start(every_type(tmp_path), base=tmp_path)
    before = gw.listener("tls").server_tls
    wss_before = gw.listener("wss").server_tls
    assert before is not None and wss_before is not None
    old = before.fingerprint
    (tmp_path / "server.pem").unlink()
    (tmp_path / "server.key").unlink()
    ensure_dev_server_cert(tmp_path / "server.pem", tmp_path / "server.key")
    new = fingerprint(x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes()))
    assert new != old
    gw.reload(every_type(tmp_path))
    assert before.fingerprint == new
    assert wss_before.fingerprint == new
    assert gw.connect("tls").peer.origin.transport == "tls"  # new handshakes use it
    assert len(gw.logged("reloaded TLS material")) == 2


def test_changes_that_need_a_restart_are_reported_and_not_applied(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path)
    restart = gw.reload(every_type(tmp_path).replace("port = 8006", "port = 9006"))
    assert restart == ['listener "tcp" port']
    assert gw.listener("tcp").config.port == 8006


# Caps over mixed transports


def test_max_connections_per_ip_counts_every_stream_transport(start, tmp_path):
    gw = start("[limits]\nmax_connections_per_ip = 3\n" + every_type(tmp_path), base=tmp_path)
    gw.connect("tcp", host="127.0.0.7")
    gw.connect("tls", host="127.0.0.7")
    assert gw.websocket("ws", host="127.0.0.7").opened
    assert not gw.websocket("wss", host="127.0.0.7").opened
    assert gw.connect("tcp", host="127.0.0.7").closed
    assert not gw.connect("tcp", host="127.0.0.8").closed
    assert gw.bus.metrics.disconnects["max_connections_per_ip"] == 2


def test_closed_connections_give_their_place_back(start, tmp_path):
    gw = start("[limits]\nmax_connections = 2\n" + every_type(tmp_path), base=tmp_path)
    first = gw.connect("tcp")
    web = gw.websocket_connection("ws")
    assert gw.connect("tls").closed
    first.close()
    web.close()
    assert gw.service.governor.gate.total == 0
    assert gw.websocket("wss").opened
    assert not gw.connect("tls").closed


# The drain


def test_the_drain_flushes_queued_output_then_closes_everyone(start, tmp_path):
    gw = start("[gateway]\nshutdown_timeout = 5\n" + every_type(tmp_path), base=tmp_path)
    line = gw.connect("tcp")
    slow = gw.connect("tcp")
    web = gw.websocket("ws")
    slow.stall()
    line.send(b"before the end\n")
    assert gw.stop()
    assert slow.closing
    assert web.closed is not None and web.closed[1] == 1001
    assert gw.logged(r"^shutting down: closing 3 peers$")
    assert gw.logged(r"^stopped$")
    assert gw.service.problems() == ["gateway: shutting down"]


def test_stop_with_no_peers_is_immediate(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path)
    stopping = gw.service.stopService()
    done: list[object] = []
    stopping.addBoth(done.append)
    gw.flush()
    assert done == [None]
    assert all(service.port is None for service in gw.service.listeners.values())


# History and presence


def test_history_replays_to_joiners_of_every_transport(start, tmp_path):
    gw = start("[channels.main]\nhistory = 2\n" + every_type(tmp_path), base=tmp_path)
    sender = gw.connect("tcp")
    sender.send(b"one\ntwo\nthree\n")
    assert gw.connect("tcp").lines() == [b"two", b"three"]
    assert gw.connect("tls").lines() == [b"two", b"three"]
    assert gw.websocket("ws").texts() == ["two", "three"]
    events = gw.websocket("wss", protocols=[JSON_SUBPROTOCOL]).events()
    replayed = [e for e in events if e["type"] == "message"]
    assert [(e["text"], e["history"]) for e in replayed] == [("two", True), ("three", True)]
    udp = gw.datagrams("udp")
    udp.send(b"\n")
    assert udp.received() == [b"two\n", b"three\n"]


def test_json_clients_see_peers_of_every_transport_join_and_leave(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path)
    watcher = gw.websocket("ws", protocols=[JSON_SUBPROTOCOL])
    assert watcher.events()[0]["type"] == "welcome"
    watcher.take()
    line = gw.connect("tcp")
    gw.connect("tls")
    gw.datagrams("udp").send(b"\n")
    gw.websocket("wss")
    line.close()
    events = [(e["type"], e["peer"], e["transport"]) for e in watcher.events()]
    assert events == [
        ("join", "tcp-1", "tcp"),
        ("join", "tls-1", "tls"),
        ("join", "udp-1", "udp"),
        ("join", "wss-1", "wss"),
        ("leave", "tcp-1", "tcp"),
    ]


def test_the_fake_backplane_sees_local_batches_and_feeds_remote_ones(start, tmp_path):
    gw = start(every_type(tmp_path), base=tmp_path, backplane=True)
    line = gw.connect("tcp")
    web = gw.websocket("ws")
    line.send(b"local\n")
    assert gw.backplane is not None
    assert [list(batch.payloads) for batch in gw.backplane.forwarded] == [[b"local"]]
    assert ("join", "tcp-1", "main") in gw.backplane.presence_events
    assert gw.backplane.remote_message(b"from afar") == 2
    assert line.lines() == [b"from afar"]
    assert web.texts() == ["local", "from afar"]


ROOMS = """
[channels."room.*"]
history = 2

[[listeners]]
name = "one"
type = "tcp"
port = 8006
channel = "room.1"

[[listeners]]
name = "two"
type = "tcp"
port = 8007
channel = "room.2"

[[listeners]]
name = "main"
type = "tcp"
port = 8008
"""


def test_a_pattern_table_gives_history_to_every_channel_it_matches(start):
    gw = start(ROOMS)
    for listener in ("one", "two", "main"):
        gw.connect(listener).send(b"a\nb\nc\n")
    assert gw.connect("one").lines() == [b"b", b"c"]
    assert gw.connect("two").lines() == [b"b", b"c"]
    assert gw.connect("main").lines() == []  # "main" matches no table: no history


def test_a_reload_resizes_history(start):
    gw = start(ROOMS)
    gw.connect("one").send(b"a\nb\nc\n")
    gw.reload(ROOMS.replace("history = 2", "history = 1"))
    assert gw.connect("one").lines() == [b"c"]
    gw.reload(ROOMS.replace("history = 2", "history = 0"))
    assert gw.connect("one").lines() == []


def test_history_remembers_a_bounded_number_of_channels():
    from gateway.core.history import History
    from gateway.core.message import Batch, Origin

    history = History(lambda name: 1 if name.startswith("kept") else 0, max_channels=3)
    origin = Origin("p", "l", "tcp")
    for name in ["kept.1", "none.1", "none.2", "kept.2", "kept.3", "kept.4"]:
        history.record(Batch(origin, name, [name.encode()]))
    assert len(history._kept) <= 3
    assert [list(b.payloads) for b in history.replay("kept.4")] == [[b"kept.4"]]


def test_history_comes_after_the_welcome_and_names_its_sender(start):
    gw = start(
        '[channels.main]\nhistory = 3\n[[listeners]]\nname = "tcp"\ntype = "tcp"\nport = 1\n'
        'welcome = "hello {peer}"\n[[listeners]]\nname = "ws"\ntype = "ws"\nport = 2\n'
        "ping_interval = 0\n"
    )
    sender = gw.connect("tcp")
    sender.send(b"m1\nm2\nm3\nm4\n")
    assert gw.connect("tcp").lines() == [b"hello tcp-2", b"m2", b"m3", b"m4"]
    events = gw.websocket("ws", protocols=[JSON_SUBPROTOCOL]).events()
    assert events[0]["type"] == "welcome"
    assert [(e["text"], e["history"], e["from"]) for e in events[1:]] == [
        ("m2", True, "tcp-1"),
        ("m3", True, "tcp-1"),
        ("m4", True, "tcp-1"),
    ]
