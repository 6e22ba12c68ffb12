"""Shared fixtures: start the real ``gateway`` command and talk to it with real sockets."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

GATEWAY = [sys.executable, "-m", "gateway"]
LISTENING = re.compile(r'listening (\w+) (\S+):(\d+) \(listener "([^"]+)"')
TIMEOUT = 10.0


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

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for a log line matching ``pattern`` (lines seen before count too)."""
        regex = re.compile(pattern)
        for line in list(self.log):
            if m := regex.search(line):
                return m
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no log line matching {pattern!r}; log:\n" + "\n".join(self.log)
                )
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if m := regex.search(line):
                return m

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


@pytest.fixture
def run_gateway(tmp_path: Path) -> Iterator[object]:
    """Start gateways from TOML text; all are stopped at the end of the test."""
    started: list[GatewayProcess] = []

    def start(toml: str, listeners: int | None = None) -> GatewayProcess:
        path = tmp_path / f"gateway{len(started)}.toml"
        path.write_text(toml)
        gw = GatewayProcess(path)
        started.append(gw)
        gw.wait_listening(listeners if listeners is not None else toml.count("[[listeners]]"))
        return gw

    yield start
    for gw in started:
        gw.stop(signal.SIGKILL if os.environ.get("GATEWAY_TEST_KILL") else signal.SIGTERM)


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
