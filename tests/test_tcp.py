"""The line protocol in memory: framing, welcome, quit, limits, slow consumers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.testing import MemoryGateway, StreamConnection
from tests.conftest import one_tcp_listener

config = one_tcp_listener


def take(connection: StreamConnection) -> bytes:
    """What the client received since the last ``take``."""
    data = connection.received()
    connection.client.received = b""
    return data


def test_lines_are_relayed_with_cr_stripped_and_empty_lines_ignored(start):
    gw = start()
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"one\r\n\r\n\ntwo\nthree\r")
    assert take(b) == b"one\ntwo\n"
    a.send(b"\n")
    assert take(b) == b"three\n"
    assert take(a) == b""  # no echo


def test_only_one_trailing_cr_is_removed(start):
    gw = start()
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"x\r\r\n\rinner\r\n")
    assert take(b) == b"x\r\n\rinner\n"


def test_one_write_per_batch(start):
    gw = start()
    a, b = gw.connect("tcp"), gw.connect("tcp")
    writes: list[bytes] = []
    write = b.server_io.write

    def record(data: bytes) -> None:
        writes.append(data)
        write(data)

    b.server_io.write = record
    a.send(b"".join(b"line %d\n" % i for i in range(100)))
    assert len(writes) == 1
    assert writes[0].count(b"\n") == 100
    assert take(b) == writes[0]


def test_welcome_fields(start):
    gw = start('welcome = "hi {peer}, #{count} on {name}"')
    a = gw.connect("tcp")
    assert take(a) == b"hi tcp-1, #1 on gw\n"
    b = gw.connect("tcp")
    assert take(b) == b"hi tcp-2, #2 on gw\n"


def test_welcome_counts_every_transport(start):
    gw = start(
        'welcome = "{count}"', more='[[listeners]]\nname = "udp"\ntype = "udp"\nport = 8008\n'
    )
    gw.datagrams("udp").send(b"")  # a UDP peer joins
    assert gw.bus.peer_count == 1
    t = gw.connect("tcp")
    assert take(t) == b"2\n"


def test_quit_command_relays_lines_before_it_and_closes(start):
    gw = start('quit_command = "close"')
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"before\nclose\r\nafter\n")
    assert take(b) == b"before\n"
    assert a.closed
    assert a.client.lost is not None
    a.server_protocol.dataReceived(b"more\n")  # bytes still arriving after the close
    gw.flush()
    assert take(b) == b""
    assert gw.bus.peer_count == 1


def test_a_line_merely_containing_the_quit_command_is_relayed(start):
    gw = start('quit_command = "close"')
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"close the door\n")
    assert take(b) == b"close the door\n"
    assert not a.closed


def test_oversize_line_closes_after_relaying_what_came_before(start):
    gw = start(limits="max_message_bytes = 10")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"0123456789\r\nshort\n01234567890\nlater\n")
    assert take(b) == b"0123456789\nshort\n"
    assert a.closed
    assert b"too long" in a.received()
    assert gw.bus.metrics.dropped["oversize"] == 1
    assert gw.bus.peer_count == 1


def test_a_partial_line_over_the_limit_closes_before_its_newline(start):
    gw = start(limits="max_message_bytes = 10")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"0123456789\r")  # exactly the limit plus a CR: still fine
    assert not a.closed
    a.send(b"\n0123456789ab")
    assert take(b) == b"0123456789\n"
    assert a.closed


def test_slow_consumer_is_disconnected_past_max_pending_bytes(start):
    gw = start(limits="max_pending_bytes = 1024")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    b.stall()  # the transport says its buffer is full
    a.send(b"x" * 500 + b"\n")
    a.send(b"x" * 500 + b"\n")
    assert not b.server_io.disconnecting
    a.send(b"x" * 500 + b"\n")
    assert b.server_io.disconnecting  # aborted (iosim records both the same way)
    assert gw.bus.metrics.disconnects["slow_consumer"] == 1
    assert gw.bus.peer_count == 1
    b.unstall()
    assert b.closed


def test_a_consumer_that_drains_in_time_loses_nothing(start):
    gw = start(limits="max_pending_bytes = 1024")
    a, b = gw.connect("tcp"), gw.connect("tcp")
    for _ in range(10):
        b.stall()
        a.send(b"y" * 900 + b"\n")
        b.unstall()
    assert not b.closed
    assert take(b) == (b"y" * 900 + b"\n") * 10
    assert gw.bus.metrics.disconnects["slow_consumer"] == 0


def test_disconnect_detaches(start):
    gw = start()
    a = gw.connect("tcp")
    assert gw.bus.peer_count == 1
    a.close()
    assert gw.bus.peer_count == 0
    assert not gw.listener("tcp").runtime.connections


def test_over_iosim_two_clients_talk(start):
    gw = start('welcome = "w"')
    a, b = gw.connect("tcp"), gw.connect("tcp")
    a.send(b"hello\nworld\n")
    assert b.received() == b"w\nhello\nworld\n"
    assert a.received() == b"w\n"


chunks = st.lists(st.binary(max_size=40), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks, st.data())
def test_any_split_of_the_stream_gives_the_same_messages(pieces, data):
    stream = b"\n".join(p for p in pieces) + b"\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    expected = [line[:-1] if line.endswith(b"\r") else line for line in stream.split(b"\n")[:-1]]
    expected = [line for line in expected if line]

    gw = MemoryGateway(config(limits="max_message_bytes = 1000"))
    try:
        a, b = gw.connect("tcp"), gw.connect("tcp")
        start = 0
        for cut in [*cuts, len(stream)]:
            a.send(stream[start:cut])
            start = cut
        assert b.lines() == expected
        assert b.received() == b""
    finally:
        gw.stop()
