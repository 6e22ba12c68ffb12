"""Flow control against the real gateway: stalled readers, bounded memory, caps, timeouts."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading

import pytest

from tests.conftest import (
    TIMEOUT,
    GatewayProcess,
    Line,
    read_until_closed,
    stalled_reader,
    tls_connect,
    tls_context,
    websocket_upgrade,
)
from tests.test_websocket_integration import ServerFrames, numbered
from tests.toml import toml_listener, toml_table

MiB = 1024 * 1024
LINE = 1000  # bytes per message, newline included
TOTAL = 100 * MiB


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class FastReader(threading.Thread):
    """Reads everything, checks per-sender order, and tells how far it got."""

    def __init__(self, port: int = 0, sock: socket.socket | None = None) -> None:
        super().__init__(daemon=True)
        self.sock = sock if sock is not None else Line(port).sock
        self.received = 0
        self.error: str | None = None
        self.progress = threading.Condition()

    def run(self) -> None:
        expected = 0
        sock = self.sock
        rest = b""
        try:
            while expected < TOTAL // LINE:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    self.error = f"closed after {expected} messages"
                    return
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if int(line[:12]) != expected or len(line) != LINE - 1:
                        self.error = f"message {expected} arrived as {line[:20]!r}"
                        return
                    expected += 1
                with self.progress:
                    self.received = expected
                    self.progress.notify_all()
        except OSError as e:
            self.error = f"{e} after {expected} messages"
        finally:
            with self.progress:
                self.received = expected
                self.progress.notify_all()

    def wait_until(self, count: int) -> None:
        with self.progress:
            ok = self.progress.wait_for(
                lambda: self.received >= count or self.error is not None, TIMEOUT
            )
        assert ok and self.error is None, self.error or f"stuck at {self.received}"


def flood_past_a_stalled_reader(
    gw: GatewayProcess, publisher: socket.socket, reader: FastReader
) -> None:
    """Send 100 MiB in order, paced by the honest ``reader``, which must get all of it; the
    gateway's RSS must stay within 4 MiB of where it was (peaks sampled on the way)."""
    pid = gw.proc.pid
    baseline = peak = rss_kib(pid)
    reader.start()
    count = TOTAL // LINE
    step = 512  # messages per send (about 0.5 MiB)
    for start in range(0, count, step):
        publisher.sendall(
            b"".join(
                b"%012d" % i + b"m" * (LINE - 13) + b"\n"
                for i in range(start, min(start + step, count))
            )
        )
        reader.wait_until(start)  # stay at most one step ahead of the honest reader
        if start % (step * 16) == 0:
            peak = max(peak, rss_kib(pid))
    reader.wait_until(count)
    peak = max(peak, rss_kib(pid))
    reader.join(TIMEOUT)
    assert reader.error is None
    growth_mib = (peak - baseline) / 1024
    # 100 MiB went through; the stalled reader may cost its socket buffer, the
    # transport's 64 KiB and max_pending_bytes, nothing more (allocator slack aside).
    assert growth_mib < 4, (
        f"RSS grew {growth_mib:.1f} MiB over a {baseline / 1024:.1f} MiB baseline"
    )


@pytest.mark.parametrize("policy", ["disconnect", "drop"])
def test_stalled_reader_costs_bounded_memory_and_honest_readers_lose_nothing(run_gateway, policy):
    gw = run_gateway(
        toml_table("limits", max_message_bytes=4096, max_pending_bytes=MiB, slow_consumer=policy)
        + toml_listener("tcp")
    )
    port = gw.ports["tcp"]
    publisher = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    reader = FastReader(port)
    stalled = stalled_reader(port)  # and it never reads
    gw.wait_for("tcp-3 connected")
    flood_past_a_stalled_reader(gw, publisher, reader)
    if policy == "disconnect":
        gw.wait_for("tcp-3 is not reading: over 1048576 bytes pending; disconnecting")
        stalled.settimeout(TIMEOUT)
        with pytest.raises(ConnectionResetError):
            read_until_closed(stalled, 1 << 20)
    else:
        gw.wait_for("tcp-3 is not reading: over 1048576 bytes pending; dropping its messages")
        # Once it reads again it gets only whole messages, in order, then everything new.
        stalled.settimeout(0.5)
        data = bytearray()
        with contextlib.suppress(TimeoutError):
            read_until_closed(stalled, 1 << 20, into=data)
        lines = bytes(data).split(b"\n")
        assert lines.pop() == b""
        numbers = [int(line[:12]) for line in lines]
        assert all(len(line) == LINE - 1 for line in lines)
        assert numbers == sorted(numbers) and len(numbers) < TOTAL // LINE
        publisher.sendall(b"%012d" % 10**9 + b"z" * (LINE - 13) + b"\n")
        gw.wait_for("tcp-3 caught up")
        stalled.settimeout(TIMEOUT)
        tail = b""
        while not tail.endswith(b"\n"):
            tail += stalled.recv(LINE)
        assert tail.startswith(b"%012d" % 10**9)
    stalled.close()
    publisher.close()


def test_a_stalled_tls_reader_is_cut_and_an_honest_one_gets_everything_in_order(run_gateway):
    """TLS records go straight to an idle socket: one that stops reading still pauses its
    peer's output (so the slow-consumer policy sees it) and costs bounded memory."""
    gw = run_gateway(
        toml_table(
            "limits", max_message_bytes=4096, max_pending_bytes=MiB, slow_consumer="disconnect"
        )
        + toml_listener("tcp")
        + toml_listener("tls", certs="certs", generate_dev_cert=True)
    )
    publisher = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=TIMEOUT)
    reader = FastReader(sock=tls_connect(gw))
    stalled = tls_context(gw).wrap_socket(
        stalled_reader(gw.ports["tls"]), server_hostname="localhost"
    )  # and it never reads after its handshake
    gw.wait_count(r"tls-\d+ connected", 2)
    flood_past_a_stalled_reader(gw, publisher, reader)
    gw.wait_for("tls-2 is not reading: over 1048576 bytes pending; disconnecting")
    stalled.close()
    publisher.close()


FLOOD_LINES = 40_000  # of 100 bytes: 4 MB read, about 10 MB of JSON envelopes out

PUBLISHER = f"""
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for start in range(0, {FLOOD_LINES}, 500):
    sock.sendall(b"".join(b"%012d" % i + b"p" * 87 + b"\\n" for i in range(start, start + 500)))
sock.shutdown(socket.SHUT_WR)
sock.recv(1)
"""


@pytest.mark.parametrize("receiver", ["ws", "tcp", "tls"])
def test_a_json_receiver_that_reads_at_once_keeps_up_with_a_flood(run_gateway, receiver):
    """A JSON envelope is over twice the size of the line it carries: a receiver that
    reads everything at once must get it all, and never be cut as a slow consumer."""
    gw = run_gateway(
        toml_listener("in", "tcp")
        + toml_listener("tcp", format="json")
        + toml_listener("tls", certs="certs", generate_dev_cert=True, format="json")
        + toml_listener("ws")
    )
    if receiver == "ws":
        sock = socket.create_connection(("127.0.0.1", gw.ports["ws"]), timeout=TIMEOUT)
        websocket_upgrade(sock, protocol="gateway.v1.json")
    elif receiver == "tls":
        sock = tls_connect(gw)
    else:
        sock = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=TIMEOUT)
    gw.wait_for(f'connected from .* \\(listener "{receiver}"')
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(gw.ports["in"])])
    try:
        marker = b'"text":"'
        seen, tail, last = 0, b"", b""
        while seen < FLOOD_LINES:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {seen} messages: {gw.log[-3:]}"
            data = tail + chunk
            seen += data.count(marker)
            tail = data[-(len(marker) - 1) :]
            last = data
        assert b'"text":"%012d' % (FLOOD_LINES - 1) in last
    finally:
        publisher.kill()
        publisher.wait()
        sock.close()
    assert not [line for line in gw.log if "not reading" in line or "slow consumer" in line]


@pytest.mark.parametrize("policy", ["disconnect", "drop"])
def test_a_stalled_websocket_reader_gets_the_slow_consumer_policy(run_gateway, policy):
    """A ws peer is written through like a TCP one, but the policy is the same: cut
    after ``max_pending_bytes`` (1008, then dropped), or only whole frames dropped."""
    gw = run_gateway(
        toml_table("limits", max_pending_bytes=MiB, slow_consumer=policy)
        + toml_listener("tcp")
        + toml_listener("ws")
    )
    port = gw.ports["ws"]
    stalled = stalled_reader(port)  # and, once upgraded, it does not read
    websocket_upgrade(stalled, host=f"127.0.0.1:{port}")
    gw.wait_for("ws-1 connected")
    publisher = socket.create_connection(("127.0.0.1", gw.ports["tcp"]), timeout=TIMEOUT)
    sent = 0
    while not [line for line in gw.log if "ws-1 is not reading" in line]:
        assert sent < 200_000, "never over the limit"
        publisher.sendall(numbered(sent, sent + 2000))
        sent += 2000
    if policy == "disconnect":
        gw.wait_for("ws-1 is not reading: over 1048576 bytes pending; disconnecting")
        gw.wait_for("ws-1 disconnected \\(slow consumer\\)")
        with pytest.raises(ConnectionResetError):
            read_until_closed(stalled, 1 << 20)
    else:
        gw.wait_for("ws-1 is not reading: over 1048576 bytes pending; dropping its messages")
        frames = ServerFrames(stalled)
        stalled.settimeout(0.5)
        numbers = []
        with contextlib.suppress(TimeoutError):
            while True:  # only whole text frames, in order, some missing
                opcode, payload = frames.next()
                assert opcode == 0x1 and len(payload) == 99, (opcode, payload[:20])
                numbers.append(int(payload[:12]))
        assert frames.data == b""
        assert numbers == sorted(numbers) and 0 < len(numbers) < sent
        publisher.sendall(numbered(10**9, 10**9 + 1))
        gw.wait_for("ws-1 caught up")
        stalled.settimeout(TIMEOUT)
        while (frame := frames.next())[1][:12] != b"%012d" % 10**9:
            assert frame[0] == 0x1  # what was sent before it, still in order
    stalled.close()
    publisher.close()
