"""``workers = N``: the supervisor in memory, and real workers sharing real ports."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.config import AdminSettings, ClusterSettings, load
from gateway.ops.supervisor import Supervisor
from gateway.ops.workers import READY_FD, WorkerSpec, pick_ports, worker_config
from gateway.transports.listening import shared_socket
from tests.conftest import TIMEOUT, Datagram, GatewayProcess, Line


def config_text(redis_url: str, workers: int = 2, port: int = 0) -> str:
    return f"""
[gateway]
workers = {workers}

[cluster]
redis = "{redis_url}"
node = "gw"

[[listeners]]
name = "tcp"
type = "tcp"
port = {port}

[[listeners]]
name = "udp"
type = "udp"
port = 0

[[listeners]]
name = "ws"
type = "ws"
port = 0
"""


# The configuration each worker runs


def test_worker_config_names_the_node_and_fixes_ports(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(config_text("redis://127.0.0.1:1") + "[admin]\nport = 9100\n")
    config = load(path)
    ports = pick_ports(config)
    assert set(ports) == {"tcp", "udp", "ws"} and ports["tcp"] != ports["ws"]
    spec = WorkerSpec.parse(WorkerSpec(2, "gw", ports).argument())
    worker = worker_config(config, spec)
    assert worker.cluster == ClusterSettings("redis://127.0.0.1:1", "gw-2", "gateway")
    assert {listener.name: listener.port for listener in worker.listeners} == ports
    assert worker.admin == AdminSettings("127.0.0.1", 9101)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_shared_sockets_bind_one_port_twice(kind):
    first = shared_socket("127.0.0.1", 0, kind)
    port = first.getsockname()[1]
    second = shared_socket("127.0.0.1", port, kind)
    assert second.getsockname()[1] == port
    first.close()
    second.close()


# The supervisor in memory


class FakeProcess:
    def __init__(self, pid: int, args: list[str], protocol: Any) -> None:
        self.pid = pid
        self.args = args
        self.protocol = protocol
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)

    def ready(self) -> None:
        self.protocol.childDataReceived(READY_FD, b"ready\n")

    def exit(self, code: int | None = 0, signum: int | None = None) -> None:
        if code == 0 and signum is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code, signum))
        self.protocol.processEnded(reason)


class ProcessClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None) -> FakeProcess:
        assert childFDs == {0: "w", 1: "r", 2: "r", READY_FD: "r"}
        process = FakeProcess(1000 + len(self.processes), args, protocol)
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


@pytest.fixture
def supervised(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(config_text("redis://127.0.0.1:1"))
    reactor = ProcessClock()
    out = io.BytesIO()
    supervisor = Supervisor(reactor, load(path), path, {"tcp": 7000}, "python", out, io.BytesIO())
    supervisor.start()
    return reactor, supervisor, out


def test_starts_each_worker_with_its_number_node_and_ports(supervised):
    reactor, _, _ = supervised
    specs = [WorkerSpec.parse(p.args[p.args.index("--worker") + 1]) for p in reactor.processes]
    assert specs == [WorkerSpec(1, "gw", {"tcp": 7000}), WorkerSpec(2, "gw", {"tcp": 7000})]
    assert reactor.processes[0].args[:4] == ["python", "-m", "gateway", "--config"]


def test_output_is_marked_with_the_node_line_by_line(supervised):
    reactor, _, out = supervised
    worker = reactor.processes[1].protocol
    worker.childDataReceived(1, b"first li")
    worker.childDataReceived(1, b'ne\n{"level": "info", "message": "json"}\npartial')
    assert out.getvalue().splitlines() == [
        b"[gw-2] first line",
        b'{"worker":"gw-2","level": "info", "message": "json"}',
    ]
    assert json.loads(out.getvalue().splitlines()[1])["worker"] == "gw-2"
    reactor.processes[1].exit(1)
    assert out.getvalue().splitlines()[2] == b"[gw-2] partial"


def test_a_crashed_worker_is_restarted_with_backoff(supervised):
    reactor, supervisor, _ = supervised
    for process in reactor.processes:
        process.ready()
    delays = []
    for _ in range(6):
        before = len(reactor.processes)
        reactor.processes[-1 if len(reactor.processes) > 2 else 0].exit(None, signal.SIGKILL)
        waited = 0.0
        while len(reactor.processes) == before:
            reactor.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    reactor.processes[-1].ready()
    reactor.advance(60)
    reactor.processes[-1].exit(3)  # after a minute of running: back to the shortest delay
    reactor.advance(0.5)
    assert len(reactor.processes) == 9
    assert not supervisor.failed.called


def test_a_worker_that_cannot_start_stops_everything(supervised):
    reactor, supervisor, _ = supervised
    first, second = reactor.processes
    first.ready()
    second.exit(1)
    assert supervisor.failed.result == 1
    assert first.signals == [signal.SIGTERM]
    stopped = supervisor.stop()
    assert not stopped.called
    first.exit(0)
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.processes) == 2  # nothing restarted


def test_stop_terminates_then_kills_what_is_left(supervised):
    reactor, supervisor, _ = supervised
    first, second = reactor.processes
    first.ready(), second.ready()
    stopped = supervisor.stop()
    assert first.signals == second.signals == [signal.SIGTERM]
    first.exit(0)
    reactor.advance(supervisor.config.gateway.shutdown_timeout + 5)
    assert second.signals == [signal.SIGTERM, signal.SIGKILL]
    assert not stopped.called
    second.exit(None, signal.SIGKILL)
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.processes) == 2


def test_sighup_goes_to_every_worker(supervised):
    reactor, supervisor, _ = supervised
    supervisor.signal_all(signal.SIGHUP)
    assert [p.signals for p in reactor.processes] == [[signal.SIGHUP], [signal.SIGHUP]]


# Real workers


def start_workers(run_gateway, redis_server) -> GatewayProcess:
    gw: GatewayProcess = run_gateway(config_text(redis_server.url), listeners=3)
    gw.wait_count(r"\] .*backplane up", 2)
    return gw


def worker_of(gw: GatewayProcess, pattern: str) -> set[str]:
    return {m.group(1) for line in gw.log if (m := re.match(rf"\[(gw-\d)\] .*{pattern}", line))}


def test_two_workers_share_every_port_and_relay_across_workers(run_gateway, redis_server):
    gw = start_workers(run_gateway, redis_server)
    lines = [Line(gw.ports["tcp"]) for _ in range(20)]
    gw.wait_count("tcp-.* connected from", 20)
    assert worker_of(gw, "tcp-.* connected from") == {"gw-1", "gw-2"}
    datagrams = [Datagram(gw.ports["udp"]) for _ in range(20)]
    for datagram in datagrams:
        datagram.send(b"")
    gw.wait_count("udp-.* joined from", 20)
    assert worker_of(gw, "udp-.* joined from") == {"gw-1", "gw-2"}  # each source stays on one

    lines[0].send(b"one\ntwo\n")
    for line in lines[1:]:
        assert line.lines(2) == [b"one", b"two"]  # once each, whichever worker holds it
    for datagram in datagrams:
        assert (datagram.recv(), datagram.recv()) == (b"one\n", b"two\n")
    datagrams[5].send(b"three")
    for line in lines:
        assert line.line() == b"three"
    assert all(line.nothing_within(0.2) for line in lines[:3])


def test_a_crashed_worker_is_restarted_and_sigterm_stops_all(run_gateway, redis_server):
    gw = start_workers(run_gateway, redis_server)
    pids = {int(m) for m in re.findall(r"worker \d started \(pid (\d+)", "\n".join(gw.log))}
    assert len(pids) == 2
    crashed = min(pids)
    os.kill(crashed, signal.SIGKILL)
    gw.wait_for(
        rf"worker \d \(pid {crashed}\) ended \(killed by signal 9\); restarting it in 0.5 s"
    )
    gw.wait_count(r"\] .*backplane up", 3)
    a, b = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    gw.wait_count("tcp-.* connected from", 2)
    a.send(b"still here\n")
    assert b.line() == b"still here"
    new_pids = {
        int(m) for m in re.findall(r"worker \d started \(pid (\d+)", "\n".join(gw.log))
    } - pids
    assert gw.stop() == 0
    for pid in pids - {crashed} | new_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_cannot_listen_stops_the_gateway(tmp_path, redis_server):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    path = tmp_path / "g.toml"
    path.write_text(config_text(redis_server.url, port=taken.getsockname()[1]))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path)],
        capture_output=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    taken.close()
    output = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 1, output
    assert "cannot listen on tcp" in output and "could not start" in output
