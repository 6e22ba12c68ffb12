"""Binary stream peers in memory: ``framing = "u16"``, ``"u32"`` and ``"chunks"``."""

from __future__ import annotations

import base64
import itertools
import json
import struct
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError
from gateway.config.load import parse
from gateway.core.message import Batch, Kind, Origin
from gateway.testing import MemoryGateway, StreamConnection
from gateway.transports.binary import CHUNK_FRAMER, U16_FRAMER, U32_FRAMER, Clipped

LISTENERS = """
[gateway]
name = "gw"
[limits]
max_message_bytes = {limit}
[[listeners]]
name = "u16"
type = "tcp"
port = 8001
framing = "u16"
[[listeners]]
name = "u32"
type = "tcp"
port = 8002
framing = "u32"
[[listeners]]
name = "chunks"
type = "tcp"
port = 8003
framing = "chunks"
[[listeners]]
name = "lines"
type = "tcp"
port = 8004
[[listeners]]
name = "json"
type = "tcp"
port = 8005
format = "json"
[[listeners]]
name = "ws"
type = "ws"
port = 8006
[[listeners]]
name = "udp"
type = "udp"
port = 8007
"""


def gateway(limit: int = 100_000) -> MemoryGateway:
    return MemoryGateway(LISTENERS.format(limit=limit))


def take(connection: StreamConnection) -> bytes:
    data = connection.received()
    connection.client.received = b""
    return data


def u16(*payloads: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(p)) + p for p in payloads)


def u32(*payloads: bytes) -> bytes:
    return b"".join(struct.pack("!I", len(p)) + p for p in payloads)


def json_messages(connection: StreamConnection) -> list[dict[str, object]]:
    events = [json.loads(line) for line in take(connection).splitlines()]
    return [e for e in events if e["type"] == "message"]


def test_a_u32_peer_reaches_every_transport_as_binary():
    gw = gateway()
    sender, u16_peer, chunks, lines, json_peer = (
        gw.connect(name) for name in ("u32", "u16", "chunks", "lines", "json")
    )
    browser = gw.websocket("ws")
    udp = gw.datagrams("udp")
    udp.send(b"hi\n")  # the UDP peer joins
    for connection in (sender, u16_peer, chunks, lines, json_peer):
        take(connection)
    browser.take()
    data = b"\x00\n\xffbinary\r\n"
    sender.send(u32(data, b"second"))
    assert take(u16_peer) == u16(data, b"second")
    assert take(chunks) == data + b"second"
    assert take(lines) == data + b"\n" + b"second\n"
    assert json_messages(json_peer) == [
        {
            "type": "message",
            "from": "u32-1",
            "transport": "tcp",
            "listener": "u32",
            "channel": "main",
            "base64": b,
        }
        for b in (base64.b64encode(data).decode(), base64.b64encode(b"second").decode())
    ]
    assert browser.take() == [(data, True), (b"second", True)]
    assert udp.received()[-2:] == [data + b"\n", b"second\n"]


def test_every_transport_reaches_a_u32_peer_with_its_prefix():
    gw = gateway()
    receiver = gw.connect("u32")
    gw.connect("lines").send(b"from lines\n")
    assert take(receiver) == u32(b"from lines")
    gw.websocket("ws").sendMessage(b"\x00\x01", isBinary=True)
    gw.flush()
    assert take(receiver) == u32(b"\x00\x01")
    gw.connect("chunks").send(b"raw bytes")
    assert take(receiver) == u32(b"raw bytes")
    gw.connect("u16").send(u16(b"short"))
    assert take(receiver) == u32(b"short")


def test_empty_messages_are_ignored_and_messages_may_arrive_in_any_pieces():
    gw = gateway()
    sender, receiver = gw.connect("u16"), gw.connect("u16")
    stream = u16(b"a", b"", b"bc") + struct.pack("!H", 0) + u16(b"d" * 300)
    for i in range(len(stream)):
        sender.send(stream[i : i + 1])
    assert take(receiver) == u16(b"a", b"bc", b"d" * 300)


def test_the_complete_messages_before_an_oversize_length_are_relayed_then_the_peer_is_cut():
    gw = gateway(limit=100)
    sender, receiver = gw.connect("u32"), gw.connect("u32")
    sender.send(u32(b"kept") + struct.pack("!I", 101) + b"x" * 50)
    assert take(receiver) == u32(b"kept")
    assert sender.closed
    assert take(sender) == b""  # no text written into a binary stream
    assert gw.bus.metrics.dropped["oversize"] == 1
    assert gw.logged("sent a message of at least 101 bytes")


def test_a_length_over_the_limit_cuts_the_peer_before_its_payload_arrives():
    gw = gateway(limit=100)
    sender, receiver = gw.connect("u16"), gw.connect("u16")
    sender.send(struct.pack("!H", 60000))
    assert sender.closed
    assert take(receiver) == b""


def test_a_truncated_message_at_the_end_is_never_relayed():
    gw = gateway()
    sender, receiver = gw.connect("u32"), gw.connect("u32")
    sender.send(u32(b"whole") + struct.pack("!I", 10) + b"part")
    sender.close()
    gw.flush()
    assert take(receiver) == u32(b"whole")


def test_a_message_too_long_for_a_u16_receiver_is_dropped_for_it_and_counted():
    gw = gateway()
    sender, small, big = gw.connect("u32"), gw.connect("u16"), gw.connect("u32")
    sender.send(u32(b"a", b"x" * 70_000, b"b"))
    assert take(big) == u32(b"a", b"x" * 70_000, b"b")
    assert take(small) == u16(b"a", b"b")
    assert not small.closed
    assert gw.bus.metrics.dropped["u16_too_long"] == 1
    sender.send(u32(b"y" * 65_536))
    assert take(small) == b""
    assert gw.bus.metrics.dropped["u16_too_long"] == 2


def test_chunks_are_relayed_in_order_and_split_at_the_limit():
    gw = gateway(limit=100)
    sender, receiver, browser = gw.connect("chunks"), gw.connect("chunks"), gw.websocket("ws")
    sender.send(b"x" * 250)
    sender.send(b"\nmore")
    assert take(receiver) == b"x" * 250 + b"\nmore"
    assert browser.take() == [
        (b"x" * 100, True),
        (b"x" * 100, True),
        (b"x" * 50, True),
        (b"\nmore", True),
    ]
    assert not sender.closed


def test_binary_peers_are_never_told_anything_in_text():
    gw = MemoryGateway("""
        [roles.reader]
        subscribe = ["main"]
        [[listeners]]
        name = "u16"
        type = "tcp"
        port = 8001
        framing = "u16"
        anonymous_role = "reader"
    """)
    peer = gw.connect("u16")
    peer.send(u16(b"not allowed"))
    assert take(peer) == b""
    assert not peer.closed
    assert gw.bus.metrics.dropped["forbidden"] == 1


SIGN_IN = """
[auth.users.ada]
password = "{hash}"
roles = ["all"]
[roles.all]
publish = [">"]
subscribe = [">"]
[[listeners]]
name = "u32"
type = "tcp"
port = 8001
framing = "u32"
auth = ["password"]
{extra}
"""


def signing_in(extra: str = "") -> MemoryGateway:
    from gateway.auth.credentials import hash_password

    return MemoryGateway(SIGN_IN.format(hash=hash_password("secret"), extra=extra))


def test_a_u32_peer_signs_in_with_its_first_message_and_what_follows_is_relayed():
    gw = signing_in()
    watcher = gw.connect("u32")
    watcher.send(u32(b"AUTH password ada secret"))
    sender = gw.connect("u32")
    sender.send(u32(b"AUTH password ada secret", b"after") + struct.pack("!I", 5) + b"la")
    sender.send(b"ter")
    gw.flush()
    assert take(watcher) == u32(b"after", b"later")
    assert gw.peers()[-1].origin.user == "ada"


def test_a_u32_peer_that_fails_to_sign_in_is_cut_without_a_word():
    gw = signing_in()
    peer = gw.connect("u32")
    peer.send(u32(b"AUTH password ada wrong"))
    gw.flush()
    assert peer.closed
    assert take(peer) == b""


def test_an_anonymous_u32_peers_first_message_is_an_ordinary_one():
    gw = signing_in('anonymous_role = "all"')
    watcher, sender = gw.connect("u32"), gw.connect("u32")
    watcher.send(u32(b"first"))
    sender.send(u32(b"one", b"two"))
    assert take(watcher) == u32(b"one", b"two")


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
    wide=st.booleans(),
)
def test_any_split_of_the_stream_gives_the_same_messages(payloads, cuts, wide):
    gw = gateway()
    name, pack = ("u32", u32) if wide else ("u16", u16)
    sender, receiver = gw.connect(name), gw.connect(name)
    stream = pack(*payloads)
    edges = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for start, end in itertools.pairwise(edges):
        sender.send(stream[start:end])
    assert take(receiver) == pack(*(p for p in payloads if p))


@pytest.mark.parametrize(
    ("keys", "wanted"),
    [
        ('framing = "u8"', 'framing: expected "lines", "u16", "u32" or "chunks"'),
        ('framing = "u16"\nformat = "json"', 'format: "json" needs framing = "lines"'),
        ('framing = "u32"\nwelcome = "hi"', 'welcome: applies to framing = "lines" only'),
        ('framing = "chunks"\nquit_command = "/q"', "quit_command: applies to framing"),
        ('framing = "chunks"\nauth = ["token"]', 'signs in by "cert" only'),
    ],
)
def test_framing_config_errors_name_the_key(keys, wanted):
    with pytest.raises(ConfigError, match=wanted.replace("(", r"\(")):
        parse(
            tomllib.loads(f'[[listeners]]\nname = "t"\ntype = "tcp"\nport = 1\n{keys}\n'), "c.toml"
        )


def test_framers_frame_a_batch_once_and_count_what_they_framed():
    origin = Origin("x-1", "x", "tcp")
    batch = Batch(origin, "main", [b"a", b"bc", b""], (Kind.BINARY,) * 3)
    for framer in (U16_FRAMER, U32_FRAMER):
        wire = framer.frame(batch)
        assert isinstance(wire, bytes)
        assert framer.count(wire) == 3
    chunks = CHUNK_FRAMER.frame(batch)
    assert chunks == b"abc" and CHUNK_FRAMER.count(chunks) == 3
    assert CHUNK_FRAMER.count(CHUNK_FRAMER.frame(Batch(origin, "main", [b"z"]))) == 1
    clipped = U16_FRAMER.frame(Batch(origin, "main", [b"q" * 65_536]))
    assert clipped == Clipped(b"", 1)


def test_a_stalled_u32_receiver_is_cut_past_max_pending_bytes_and_drops_are_counted_whole():
    text = LISTENERS.format(limit=100_000).replace(
        "[limits]\n", '[limits]\nmax_pending_bytes = 1024\nslow_consumer = "drop"\n'
    )
    gw = MemoryGateway(text)
    sender, slow = gw.connect("lines"), gw.connect("u32")
    slow.stall()
    for i in range(20):
        sender.send(b"%02d" % i + b"x" * 98 + b"\n")  # 104 bytes each with the prefix
    assert gw.bus.metrics.dropped["slow_consumer"] == 11  # 9 x 104 bytes fit in 1024
    slow.unstall()
    assert take(slow) == u32(*(b"%02d" % i + b"x" * 98 for i in range(9)))
    sender.send(b"after\n")
    assert take(slow) == u32(b"after")


def test_binary_messages_cross_the_cluster_as_binary():
    from gateway.testing import FakeBackplane

    gw = gateway()
    backplane = FakeBackplane(gw.bus, gw.flush)
    sender, browser = gw.connect("u32"), gw.websocket("ws")
    sender.send(u32(b"\x00to other nodes"))
    (forwarded,) = backplane.forwarded
    assert list(forwarded.messages()) == [(b"\x00to other nodes", Kind.BINARY)]
    assert browser.take() == [(b"\x00to other nodes", True)]
    receiver = gw.connect("u16")
    assert backplane.remote_message(b"from afar") == 3  # the u32, u16 and WebSocket peers
    gw.flush()
    assert take(receiver) == u16(b"from afar")


def test_a_batch_reaches_each_prefixed_receiver_in_one_write():
    gw = gateway()
    sender, receiver = gw.connect("lines"), gw.connect("u32")
    writes: list[bytes] = []
    write = receiver.server_io.write

    def record(data: bytes) -> None:
        writes.append(data)
        write(data)

    receiver.server_io.write = record  # type: ignore[method-assign]
    sender.send(b"".join(b"line %d\n" % i for i in range(100)))
    assert len(writes) == 1
    assert writes[0] == u32(*(b"line %d" % i for i in range(100)))
