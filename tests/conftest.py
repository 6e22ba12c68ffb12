"""Shared fixtures and helpers: write configurations, start the real ``gateway`` command, and
talk to it with real sockets and clients (TCP, UDP, TLS, ``websockets``, terminal clients)."""

from __future__ import annotations

import base64
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from gateway.testing import MemoryGateway

GATEWAY = [sys.executable, "-m", "gateway"]
LISTENING = re.compile(r'listening (\w+) (\S+):(\d+) \(listener "([^"]+)"')
TIMEOUT = 10.0
JSON_SUBPROTOCOL = Subprotocol("gateway.v1.json")
"""The WebSocket subprotocol of JSON envelopes (welcome, join, leave, message)."""


class GatewayProcess:
    """A running ``gateway --config`` process and the ports it bound."""

    def __init__(self, config: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [*GATEWAY, "--config", str(config), *extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ports: dict[str, int] = {}
        self.hosts: dict[str, str] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT, since: int = 0) -> re.Match[str]:
        """Wait for a log line matching ``pattern``: the first of ``log[since:]`` (lines seen
        before the call count too)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        searched = since
        while True:
            log = self.log[searched:]
            for line in log:
                if m := regex.search(line):
                    return m
            searched += len(log)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no log line matching {pattern!r}; log:\n" + "\n".join(self.log[since:])
                )
            try:
                self.lines.get(timeout=remaining)  # a new line (or one already searched)
            except queue.Empty:
                continue

    def wait_count(self, pattern: str, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until ``count`` log lines match ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while sum(1 for line in list(self.log) if regex.search(line)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"fewer than {count} lines matching {pattern!r}; log:\n" + "\n".join(self.log)
                )
            time.sleep(0.02)

    def wait_listening(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(self.ports) < count:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self._reader.join(timeout=2)
                    raise AssertionError("gateway exited early:\n" + "\n".join(self.log)) from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "gateway did not listen:\n" + "\n".join(self.log)
                    ) from None
                continue
            if m := LISTENING.search(line):
                self.ports[m.group(4)] = int(m.group(3))
                self.hosts[m.group(4)] = m.group(2).strip("[]")

    def wait_handles(self, sig: int = signal.SIGTERM) -> None:
        """Wait until the process has installed its handler for ``sig``."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/status") as status:
                for line in status:
                    if line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << (sig - 1)):
                        return
            time.sleep(0.02)
        raise AssertionError(f"no handler for signal {sig}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=2)
        return self.proc.returncode


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port that was free a moment ago, for programs that need it up front."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A ``redis-server`` on a free loopback port; can be killed, restarted, stopped."""

    def __init__(self, workdir: Path) -> None:
        assert REDIS_SERVER is not None
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """Send one command; the first line of the reply."""
        request = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh test installs it)")
    server = RedisServer(tmp_path)
    yield server
    server.close()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> None:
    """Wait until something accepts TCP connections on ``port`` (``proc`` must keep running)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            output = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"exited early with {proc.returncode}:\n{output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


class Line:
    """A TCP client that reads newline-terminated lines."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def lines(self, n: int) -> list[bytes]:
        return [self.line() for _ in range(n)]

    def nothing_within(self, seconds: float) -> bool:
        """True when no data arrives for ``seconds`` (and the connection stays open)."""
        if self.buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        self.buffer += data
        return False

    def closed(self) -> bool:
        """Read until the server closes (or resets); True when it does within the timeout."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


class Datagram:
    """A UDP client socket connected to a gateway UDP listener."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((host, port))

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self) -> bytes:
        return self.sock.recv(65536)

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(65536)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        return False

    def close(self) -> None:
        self.sock.close()


def start_gateway(config: Path, toml: str, listeners: int | None = None) -> GatewayProcess:
    """Write ``toml`` to ``config`` and start a gateway on it; return once it listens.

    ``listeners``: how many ``listening`` lines to wait for (default: one per ``[[listeners]]``).
    A gateway that does not come up is stopped before the error is raised.
    """
    config.write_text(toml)
    gw = GatewayProcess(config)
    try:
        gw.wait_listening(listeners if listeners is not None else toml.count("[[listeners]]"))
    except BaseException:
        gw.stop()
        raise
    return gw


class StartGateway(Protocol):
    """What the ``run_gateway`` fixture gives a test."""

    def __call__(self, toml: str, listeners: int | None = None) -> GatewayProcess: ...


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """Start gateways from TOML text (see ``start_gateway``); all are stopped at the end of
    the test."""
    started: list[GatewayProcess] = []

    def start(toml: str, listeners: int | None = None) -> GatewayProcess:
        gw = start_gateway(tmp_path / f"gateway{len(started)}.toml", toml, listeners)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop(signal.SIGKILL if os.environ.get("GATEWAY_TEST_KILL") else signal.SIGTERM)


# Configuration text


def make_certs(folder: Path, *args: str) -> str:
    """Make a dev PKI in ``folder`` with the real ``gateway certs`` command; what it printed."""
    made = subprocess.run(
        [*GATEWAY, "certs", "--dir", str(folder), *args], capture_output=True, text=True, timeout=30
    )
    assert made.returncode == 0, made.stderr
    return made.stdout


# Clients


def dev_ca(gw: GatewayProcess) -> Path:
    """The dev CA's certificate, made beside the gateway's config (``certs/ca.pem``)."""
    return gw.config.parent / "certs" / "ca.pem"


def tls_context(gw: GatewayProcess) -> ssl.SSLContext:
    """A client context that trusts the gateway's dev CA (see ``dev_ca``)."""
    return ssl.create_default_context(cafile=str(dev_ca(gw)))


def tls_connect(gw: GatewayProcess, listener: str = "tls") -> ssl.SSLSocket:
    """A TLS connection to ``listener`` that verified the dev certificate for ``localhost``."""
    raw = socket.create_connection(("127.0.0.1", gw.ports[listener]), timeout=TIMEOUT)
    return tls_context(gw).wrap_socket(raw, server_hostname="localhost")


def ws_url(gw: GatewayProcess, listener: str = "ws", path: str = "/ws") -> str:
    """The URL of WebSocket ``listener``: ``wss://localhost`` for wss, else ``ws://127.0.0.1``."""
    if listener == "wss":
        return f"wss://localhost:{gw.ports[listener]}{path}"
    return f"ws://127.0.0.1:{gw.ports[listener]}{path}"


def websocket(
    gw: GatewayProcess, listener: str = "ws", path: str = "/ws", **kwargs: Any
) -> ClientConnection:
    """A ``websockets`` client of ``listener`` (``wss``: trusting the dev CA) on ``path``
    (``/ws/room.1?since=17&epoch=E``); ``kwargs`` go to ``connect``."""
    if listener == "wss":
        kwargs["ssl"] = tls_context(gw)
    url = ws_url(gw, listener, path)
    client: ClientConnection = connect(url, open_timeout=TIMEOUT, **kwargs)
    return client


def websocket_upgrade(
    sock: socket.socket, host: str = "127.0.0.1", protocol: str | None = None
) -> None:
    """Complete the WebSocket handshake for ``/ws`` on ``sock`` by hand (offering subprotocol
    ``protocol``, if given); reads the response's head and not a byte more."""
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head


def masked_frame(first: int, payload: bytes, length: int | None = None) -> bytes:
    """A client frame: first byte ``first`` (FIN, RSV, opcode), a mask key, and ``length``
    (default: the payload's) declared."""
    size = len(payload) if length is None else length
    if size < 126:
        head = struct.pack("!BB", first, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_code(sock: socket.socket) -> int:
    """Read the gateway's close frame (and nothing before it) from a raw WebSocket; its code."""
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        assert chunk, f"closed without a close frame; got {data!r}"
        data += chunk
    assert data[0] == 0x88, data  # a FIN close frame
    code: int = struct.unpack("!H", data[2:4])[0]
    return code


def read_until_closed(
    sock: socket.socket, size: int = 65536, into: bytearray | None = None
) -> bytes:
    """Read until the other end closes; all it sent. An error (a reset, a timeout) is raised,
    and what came before it is in ``into`` when one is given."""
    data = bytearray() if into is None else into
    while chunk := sock.recv(size):
        data += chunk
    return bytes(data)


def stalled_reader(port: int) -> socket.socket:
    """A TCP client with a 4 KiB receive buffer: one that never reads soon fills it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


class Interactive:
    """A command driven like a terminal: lines in on its stdin, its output gathered from stdout
    (``stderr``: ``subprocess.STDOUT`` to gather that too, ``None`` to leave it to the test's)."""

    def __init__(self, argv: list[str], stderr: int | None = subprocess.STDOUT) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
        self.output = b""

    def send(self, line: bytes) -> None:
        """Type ``line`` and Enter."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def readline(self) -> bytes:
        """The next line of output (empty once the output has ended)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.output += line
        return line

    def wait_for(self, needle: bytes) -> bytes:
        """Read lines until the output holds ``needle``; all the output so far."""
        while needle not in self.output:
            if not self.readline():
                said = self.output.decode(errors="replace")
                raise AssertionError(f"{shlex.join(self.argv)} ended before {needle!r}:\n{said}")
        return self.output

    def finish(self) -> bytes:
        """End the input, wait for the command to exit (killing it after ``TIMEOUT``); all its
        output."""
        try:
            out, _ = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out
        return self.output


def gateway_client(url: str, *args: str, stderr: int | None = None) -> Interactive:
    """The real ``gateway client URL`` terminal client."""
    return Interactive([*GATEWAY, "client", url, *args], stderr=stderr)


# The admin HTTP server


def admin_get(gw: GatewayProcess, path: str) -> tuple[int, str]:
    """GET ``path`` from the gateway's admin listener: the status and the body."""
    url = f"http://127.0.0.1:{gw.ports['admin']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in exposition text."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        family, _, rest = head.partition("{")
        if family != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


# In-memory gateways (gateway.testing)


StartMemory = Callable[..., MemoryGateway]


@pytest.fixture
def memory_gateways() -> Iterator[StartMemory]:
    """``start(toml, **options)``: in-memory gateways, all stopped (drained) at the end."""
    started: list[MemoryGateway] = []

    def start(config: str, **options: Any) -> MemoryGateway:
        gateway = MemoryGateway(config, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def one_tcp_listener(listener: str = "", limits: str = "", more: str = "") -> str:
    """A gateway named "gw" with one ``tcp`` listener (``listener``: its extra keys)."""
    return f"""
[gateway]
name = "gw"

[limits]
{limits}

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006
{listener}
{more}
"""


@pytest.fixture
def start(memory_gateways: StartMemory) -> StartMemory:
    """``start(listener="", limits="", more="")``: an in-memory gateway of ``one_tcp_listener``."""

    def start(listener: str = "", limits: str = "", more: str = "") -> MemoryGateway:
        return memory_gateways(one_tcp_listener(listener, limits, more))

    return start


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a missing test: fail the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("CI") and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"CI: {len(skipped)} skipped test(s); skipping is not allowed in CI", red=True
            )
