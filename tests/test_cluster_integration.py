"""Several real gateway processes on a real ``redis-server``, with real clients.

Each test starts its own ``redis-server`` (Debian package) on a free loopback
port, without persistence, and stops it at the end.
"""

from __future__ import annotations

import collections
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    TIMEOUT,
    Datagram,
    GatewayProcess,
    Line,
    RedisServer,
    admin_get,
    metric,
    tls_connect,
    websocket,
)
from tests.toml import toml_listener, toml_table


def node_toml(redis: RedisServer, node: str, extra: str = "") -> str:
    return (
        toml_table("cluster", redis=redis.url, node=node, prefix="test")
        + extra
        + toml_listener("tcp")
        + toml_listener("udp")
        + toml_listener("ws")
    )


TLS_LISTENER = toml_listener("tls", certs="certs", generate_dev_cert=True)


def start_nodes(
    run_gateway, redis: RedisServer, names: list[str], tls: bool = False
) -> list[GatewayProcess]:
    nodes = [run_gateway(node_toml(redis, name) + (TLS_LISTENER if tls else "")) for name in names]
    for node in nodes:
        node.wait_for("backplane up")
    return nodes


# Clients that read in a thread and sort what they get by sender


Reader = Callable[[], list[bytes]]


class Client:
    """A peer of any transport: ``send`` from the test, messages gathered by a thread."""

    def __init__(self, name: str, read: Reader, send: Callable[[bytes], None] | None) -> None:
        self.name = name
        self._read = read
        self._send = send
        self.got: dict[str, list[int]] = collections.defaultdict(list)
        self.other: list[bytes] = []
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, text: str) -> None:
        assert self._send is not None
        self._send(text.encode())

    def _run(self) -> None:
        while not self.stopping:
            try:
                messages = self._read()
            except TimeoutError:
                continue
            except (EOFError, OSError, ConnectionClosed):
                return  # the gateway closed it; a waiting test reports what is missing
            with self.changed:
                for message in messages:
                    sender, _, number = message.partition(b":")
                    if number.isdigit():
                        self.got[sender.decode()].append(int(number))
                    else:
                        self.other.append(message)
                self.changed.notify_all()

    def sees(self, predicate: Callable[[Client], bool], timeout: float) -> bool:
        """Whether ``predicate`` becomes true within ``timeout`` seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def wait(self, predicate: Callable[[Client], bool], timeout: float = TIMEOUT) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self), timeout):
                counts = {sender: len(numbers) for sender, numbers in self.got.items()}
                raise AssertionError(f"{self.name}: gave up waiting; got {counts}")

    def wait_count(self, sender: str, at_least: int) -> None:
        self.wait(lambda c: len(c.got[sender]) >= at_least)

    def wait_ends(self, count: int) -> None:
        """Wait for ``count`` messages ``<sender>:end``."""
        self.wait(lambda c: sum(m.endswith(b":end") for m in c.other) >= count)

    def count(self, sender: str) -> int:
        with self.changed:
            return len(self.got[sender])

    def stop(self) -> None:
        self.stopping = True


def tcp_client(name: str, gw: GatewayProcess) -> Client:
    line = Line(gw.ports["tcp"])
    line.sock.settimeout(0.2)

    def read() -> list[bytes]:
        data = line.sock.recv(65536)
        if not data:
            raise EOFError(f"{name}: closed")
        line.buffer += data
        *lines, line.buffer = line.buffer.split(b"\n")
        return lines

    return Client(name, read, lambda data: line.send(data + b"\n"))


def udp_client(name: str, gw: GatewayProcess) -> Client:
    datagram = Datagram(gw.ports["udp"])
    try:  # root may go past rmem_max: room for bursts while the thread is not scheduled
        datagram.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
    except OSError:
        datagram.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    datagram.sock.settimeout(0.2)
    datagram.send(b"")

    def read() -> list[bytes]:
        return [datagram.sock.recv(65536).rstrip(b"\n")]

    return Client(name, read, datagram.send)


def ws_client(name: str, gw: GatewayProcess) -> Client:
    connection = websocket(gw)

    def read() -> list[bytes]:
        message = connection.recv(timeout=0.2)
        return [message.encode() if isinstance(message, str) else message]

    def send(data: bytes) -> None:
        connection.send(data.decode())

    return Client(name, read, send)


def tls_client(name: str, gw: GatewayProcess) -> Client:
    sock = tls_connect(gw)
    sock.settimeout(0.2)
    buffer = [b""]

    def read() -> list[bytes]:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"{name}: closed")
        *lines, buffer[0] = (buffer[0] + data).split(b"\n")
        return lines

    return Client(name, read, None)  # receive only: one thread per TLS socket


MAKERS = {"tcp": tcp_client, "udp": udp_client, "ws": ws_client, "tls": tls_client}


def attach(gw: GatewayProcess, *transports: str, tag: str) -> list[Client]:
    clients = [MAKERS[t](f"{tag}-{t}", gw) for t in transports]
    gw.wait_count(r"(connected|joined) from", len(clients))
    return clients


def send_stream(sender: Client, count: int, watcher: Client, window: int = 100) -> None:
    """Send ``count`` numbered messages, ``window`` at a time, paced by ``watcher`` seeing them."""
    for start in range(0, count, window):
        end = min(start + window, count)
        for i in range(start, end):
            sender.send(f"{sender.name}:{i}")
        watcher.wait_count(sender.name, end)


# Five senders of three transports on two or three nodes, 10,000 messages in all, sent at
# once; each sender is paced by a watcher on another node.
PLANS = {
    2: {"a-tcp": 3000, "b-ws": 2500, "b-udp": 2000, "a-ws": 1500, "b-tcp": 1000},
    3: {"a-tcp": 2500, "b-ws": 2000, "c-udp": 2000, "a-ws": 1500, "b-tcp": 2000},
}
WATCHERS = {
    2: {"a-tcp": "b-udp", "b-ws": "a-tls", "b-udp": "a-ws", "a-ws": "b-tls", "b-tcp": "a-udp"},
    3: {"a-tcp": "c-ws", "b-ws": "a-tcp", "c-udp": "b-tls", "a-ws": "b-udp", "b-tcp": "c-tls"},
}


@pytest.mark.parametrize("count", [2, 3])
def test_nodes_see_every_transport_exactly_once_in_order(run_gateway, redis_server, count):
    nodes = start_nodes(run_gateway, redis_server, [f"gw-{t}" for t in "abc"[:count]], tls=True)
    clients = []
    for tag, node in zip("abc", nodes, strict=False):
        clients += attach(node, "tcp", "udp", "ws", "tls", tag=tag)
    by_name = {client.name: client for client in clients}
    plan, watchers = PLANS[count], WATCHERS[count]
    assert sum(plan.values()) == 10_000
    threads = [
        threading.Thread(target=send_stream, args=(by_name[s], n, by_name[watchers[s]]))
        for s, n in plan.items()
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # A last message from each sender: anything duplicated would come before it.
    for sender in plan:
        by_name[sender].send(f"{sender}:end")
    for client in clients:
        ends = len(plan) - (client.name in plan)
        client.wait_ends(ends)
        client.stop()
    elapsed = time.monotonic() - started
    for client in clients:
        for sender, sent in plan.items():
            if sender == client.name:
                assert client.got[sender] == [], f"{client.name} got its own messages back"
            else:
                assert client.got[sender] == list(range(sent)), f"{client.name} from {sender}"
    print(f"10,000 messages to {len(clients)} peers on {count} nodes in {elapsed:.2f} s")


def test_redis_killed_and_restarted_mid_stream(run_gateway, redis_server):
    a = run_gateway(node_toml(redis_server, "gw-a", toml_table("admin", port=0)), listeners=4)
    b = run_gateway(node_toml(redis_server, "gw-b"))
    a.wait_for("backplane up")
    b.wait_for("backplane up")
    sender, local = attach(a, "tcp", "ws", tag="a")
    (remote,) = attach(b, "tcp", tag="b")
    assert admin_get(a, "/healthz") == (200, "ok\n")
    sent = 0
    stop = threading.Event()

    def stream() -> None:
        nonlocal sent
        while not stop.is_set():
            sender.send(f"a-tcp:{sent}")
            sent += 1
            time.sleep(0.002)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        remote.wait(lambda c: c.count("a-tcp") >= 100)
        redis_server.kill()
        a.wait_for("backplane down")
        b.wait_for("backplane down")
        status, body = admin_get(a, "/healthz")
        assert status == 503 and "backplane: down" in body
        during = sent
        local.wait(lambda c: c.count("a-tcp") >= during + 100)  # local delivery goes on
        redis_server.start()
        a.wait_count("backplane up", 2)
        b.wait_count("backplane up", 2)
        resumed = sent
        remote.wait(lambda c: c.count("a-tcp") > 0 and c.got["a-tcp"][-1] >= resumed + 50)
    finally:
        stop.set()
        thread.join()
    local.wait(lambda c: c.count("a-tcp") == sent)
    for client in (sender, local, remote):
        client.stop()
    assert local.got["a-tcp"] == list(range(sent))
    numbers = remote.got["a-tcp"]
    assert numbers == sorted(set(numbers)), "duplicates or disorder across the outage"
    assert numbers[:100] == list(range(100))
    assert len(numbers) < sent  # the outage lost some, as documented
    assert admin_get(a, "/healthz") == (200, "ok\n")
    metrics = admin_get(a, "/metrics")[1]
    assert metric(metrics, "gateway_backplane_up") == 1
    assert metric(metrics, "gateway_backplane_unforwarded_total") > 0


def test_stalled_redis_never_blocks_local_delivery(run_gateway, redis_server):
    a, b = start_nodes(run_gateway, redis_server, ["gw-a", "gw-b"])
    first, second = attach(a, "tcp", "tcp", tag="a")
    first.name, second.name = "first", "second"
    (remote,) = attach(b, "ws", tag="b")
    first.send("first:0")
    remote.wait(lambda c: c.count("first") == 1)
    redis_server.signal(signal.SIGSTOP)
    try:
        # Echo between two peers of one node while Redis is stopped: each round trip is quick.
        worst = 0.0
        rounds = 0
        deadline = time.monotonic() + 15
        while "backplane down" not in "\n".join(a.log):
            started = time.monotonic()
            rounds += 1
            first.send(f"first:{rounds}")
            second.wait_count("first", rounds + 1)
            second.send(f"second:{rounds}")
            first.wait_count("second", rounds)
            worst = max(worst, time.monotonic() - started)
            assert time.monotonic() < deadline, "the stall was never noticed"
        assert worst < 0.5, f"a local round trip took {worst:.3f} s during the stall"
        assert rounds > 10
    finally:
        redis_server.signal(signal.SIGCONT)
    a.wait_count("backplane up", 2, timeout=20)
    # b may or may not have noticed the stall (it depends on when its last PING went out), and
    # may still be reconnecting: what is sent meanwhile is lost for it, so repeat until it sees one.
    deadline = time.monotonic() + 20
    while not remote.sees(lambda c: any(m.startswith(b"after:") for m in c.other), 0.2):
        assert time.monotonic() < deadline, "cross-node delivery did not resume"
        first.send(f"after:{time.monotonic()}")
    numbers = remote.got["first"]
    assert numbers == sorted(set(numbers))


def test_killed_subscription_resubscribes(run_gateway, redis_server):
    a, b = start_nodes(run_gateway, redis_server, ["gw-a", "gw-b"])
    (sender,) = attach(a, "udp", tag="a")
    (receiver,) = attach(b, "tcp", tag="b")
    sender.send("a-udp:0")
    receiver.wait(lambda c: c.count("a-udp") == 1)
    assert int(redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")[1:]) == 2
    a.wait_count("backplane up", 2)
    b.wait_count("backplane up", 2)
    sender.send("a-udp:1")
    receiver.wait(lambda c: c.count("a-udp") == 2)
    assert receiver.got["a-udp"] == [0, 1]


def test_a_killed_node_leaves_the_others_unaffected(run_gateway, redis_server):
    a, b, c = start_nodes(run_gateway, redis_server, ["gw-a", "gw-b", "gw-c"])
    (on_a,) = attach(a, "ws", tag="a")
    (on_b,) = attach(b, "tcp", tag="b")
    (on_c,) = attach(c, "tcp", tag="c")
    on_a.send("a-ws:0")
    on_b.wait(lambda cl: cl.count("a-ws") == 1)
    on_c.wait(lambda cl: cl.count("a-ws") == 1)
    c.stop(signal.SIGKILL)
    for i in range(1, 101):
        on_a.send(f"a-ws:{i}")
    on_b.wait(lambda cl: cl.count("a-ws") == 101)
    on_b.send("b-tcp:0")
    on_a.wait(lambda cl: cl.count("b-tcp") == 1)
    assert on_b.got["a-ws"] == list(range(101))
    assert "backplane down" not in "\n".join(a.log + b.log)


def test_unreachable_redis_at_start_then_joins(run_gateway, tmp_path, redis_server):
    redis_server.kill()
    a = run_gateway(node_toml(redis_server, "gw-a"))
    b = run_gateway(node_toml(redis_server, "gw-b"))
    a.wait_for("cannot reach Redis")
    sender, local = attach(a, "tcp", "tcp", tag="a")
    sender.send("a-tcp:0")
    local.wait(lambda c: c.count("a-tcp") == 1)  # serves local peers meanwhile
    redis_server.start()
    a.wait_for("backplane up")
    b.wait_for("backplane up")
    (remote,) = attach(b, "tcp", tag="b")
    sender.send("a-tcp:1")
    remote.wait(lambda c: c.count("a-tcp") == 1)
    assert sum("cannot reach Redis" in line for line in a.log) == 1  # logged once


def _numsub(redis: RedisServer, channel: str) -> int:
    """``PUBSUB NUMSUB channel``: how many connections (nodes) are subscribed to it."""
    request = b"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel.encode(),
    )
    with socket.create_connection(("127.0.0.1", redis.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        reply = b""
        while reply.count(b"\r\n") < 4:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b"\r\n")[3][1:])  # *2, $len, channel, :count


def test_nodes_listen_only_for_the_channels_their_peers_want(run_gateway, redis_server):
    json_lines = toml_listener("json", "tcp", format="json")
    nodes = [run_gateway(node_toml(redis_server, name) + json_lines) for name in ("a", "b", "c")]
    for node in nodes:
        node.wait_for("backplane up")
    a, b, c = nodes
    on_a, on_b = Line(a.ports["json"]), Line(b.ports["json"])
    for client in (on_a, on_b):
        client.send(b'{"type":"subscribe","channel":"room.42"}\n')
        answer = b'{"type":"subscribed","channel":"room.42"}'
        while (line := client.line()) != answer:  # the welcome, presence of main
            assert b'"type":"message"' not in line
    bystander = Line(c.ports["tcp"])  # c has peers, none of them on room.42
    deadline = time.monotonic() + TIMEOUT
    while _numsub(redis_server, "test:room.42") != 2:  # a and b, not c
        assert time.monotonic() < deadline, "the nodes did not subscribe"
        time.sleep(0.02)
    on_b.send(b'{"type":"message","channel":"room.42","text":"only a and b"}\n')
    while b'"type":"message"' not in (event := on_a.line()):
        pass
    assert b'"channel":"room.42"' in event and b'"text":"only a and b"' in event
    assert bystander.nothing_within(0.3)
    on_a.close()
    on_b.close()
    while _numsub(redis_server, "test:room.42") != 0:  # the last subscribers left
        assert time.monotonic() < deadline, "the nodes did not unsubscribe"
        time.sleep(0.02)
