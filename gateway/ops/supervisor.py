"""The supervisor of ``workers = N``: starts the workers, restarts any that crashes, stops them all."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway import __version__
from gateway.config import (
    Config,
)
from gateway.ops.workers import READY_FD, WorkerSpec, pick_ports

log = Logger(namespace="gateway.workers")


class _WorkerProcess(ProcessProtocol):
    """One worker: forwards its output line by line, marked with its node id."""

    def __init__(self, supervisor: Supervisor, number: int, started: float) -> None:
        self.supervisor = supervisor
        self.number = number
        self.started = started
        self.ready = False
        self.pid: int | None = None
        self._partial: dict[int, bytes] = {1: b"", 2: b""}
        self._mark = supervisor.node_of(number).encode()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid if self.transport is not None else None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == READY_FD:
            if not self.ready:
                self.ready = True
                self.supervisor.worker_ready(self)
            return
        if childFD not in self._partial:
            return
        text = self._partial[childFD] + data
        *lines, self._partial[childFD] = text.split(b"\n")
        if lines:
            self.supervisor.output(childFD, b"".join(self._marked(line) + b"\n" for line in lines))

    def _marked(self, line: bytes) -> bytes:
        if line.startswith(b"{") and line.endswith(b"}") and len(line) > 2:
            return b'{"worker":"' + self._mark + b'",' + line[1:]  # a JSON log line stays JSON
        return b"[" + self._mark + b"] " + line

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self.supervisor.output(fd, self._marked(rest) + b"\n")
        self.supervisor.worker_ended(self, reason)

    def signal(self, signum: int) -> None:
        if self.transport is None:
            return
        with contextlib.suppress(ProcessExitedAlready, OSError):
            self.transport.signalProcess(signum)


def _how(reason: Failure) -> str:
    value: Any = reason.value
    if getattr(value, "signal", None):
        return f"killed by signal {value.signal}"
    return f"exit code {getattr(value, 'exitCode', '?')}"


class Supervisor:
    """Runs ``workers`` copies of the gateway and keeps them running.

    A worker that exits while the supervisor is not stopping is restarted,
    after 0.5 s doubling to 10 s for workers that keep crashing (the delay
    resets once a worker has run for a minute). A worker that cannot start
    at all (for example a port in use) makes the supervisor stop everything:
    ``failed`` then fires with its exit code.
    """

    RESTART_MIN = 0.5
    RESTART_MAX = 10.0
    STABLE_AFTER = 60.0

    def __init__(
        self,
        reactor: Any,
        config: Config,
        config_path: Path,
        ports: dict[str, int],
        executable: str = sys.executable,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
    ) -> None:
        assert config.cluster is not None, "workers need [cluster]"
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.ports = ports
        self.executable = executable
        self.count = config.gateway.workers
        self.node = config.cluster.node
        self._out = {1: stdout or sys.stdout.buffer, 2: stderr or sys.stderr.buffer}
        self.workers: dict[int, _WorkerProcess] = {}
        self._restarts: dict[int, Any] = {}
        self._crashes: dict[int, int] = {}
        self._ever_ready: set[int] = set()
        self.stopping = False
        self.failed: Deferred[int] = Deferred()
        self._stopped: Deferred[None] | None = None
        self._kill_call: Any = None

    def node_of(self, number: int) -> str:
        return f"{self.node}-{number}"

    def start(self) -> None:
        for number in range(1, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        spec = WorkerSpec(number, self.node, self.ports)
        args = [
            self.executable,
            "-m",
            "gateway",
            "--config",
            str(self.config_path),
            "--worker",
            spec.argument(),
        ]
        worker = _WorkerProcess(self, number, self.reactor.seconds())
        self.workers[number] = worker
        self.reactor.spawnProcess(
            worker,
            self.executable,
            args,
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r", READY_FD: "r"},
        )
        log.info(
            "worker {number} started (pid {pid}, node {node})",
            number=number,
            pid=worker.pid,
            node=self.node_of(number),
        )

    def output(self, fd: int, data: bytes) -> None:
        stream = self._out[fd]
        stream.write(data)
        stream.flush()

    def worker_ready(self, worker: _WorkerProcess) -> None:
        self._ever_ready.add(worker.number)

    def worker_ended(self, worker: _WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self.stopping:
            self._maybe_stopped()
            return
        if worker.number not in self._ever_ready:
            value: Any = reason.value
            code = getattr(value, "exitCode", None) or 1
            log.error(
                "worker {number} could not start ({how}); stopping the other workers",
                number=worker.number,
                how=_how(reason),
            )
            self._stop_all()
            self.failed.callback(int(code))
            return
        if self.reactor.seconds() - worker.started >= self.STABLE_AFTER:
            self._crashes[worker.number] = 0
        crashes = self._crashes[worker.number] = self._crashes.get(worker.number, 0) + 1
        delay = min(self.RESTART_MIN * 2 ** (crashes - 1), self.RESTART_MAX)
        log.warn(
            "worker {number} (pid {pid}) ended ({how}); restarting it in {delay} s",
            number=worker.number,
            pid=worker.pid,
            how="exit code 0" if reason.check(ProcessDone) else _how(reason),
            delay=delay,
        )
        self._restarts[worker.number] = self.reactor.callLater(delay, self._spawn, worker.number)

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every worker (SIGHUP: each reloads its config)."""
        for worker in list(self.workers.values()):
            worker.signal(signum)

    def stop(self) -> Deferred[None]:
        """SIGTERM every worker; SIGKILL what is left after their drain time."""
        if self._stopped is None:
            self._stop_all()
        assert self._stopped is not None
        return self._stopped

    def _stop_all(self) -> None:
        if self._stopped is not None:
            return
        self.stopping = True
        self._stopped = Deferred()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        self.signal_all(signal.SIGTERM)
        grace = self.config.gateway.shutdown_timeout + 5.0
        self._kill_call = self.reactor.callLater(grace, self.signal_all, signal.SIGKILL)
        self._maybe_stopped()

    def _maybe_stopped(self) -> None:
        if self.workers or self._stopped is None or self._stopped.called:
            return
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        log.info("all workers stopped")
        self._stopped.callback(None)


async def supervise(
    reactor: Any,
    config: Config,
    config_path: Path,
    install_signal: Callable[..., Any] = signal.signal,
) -> None:
    """Run the workers until the reactor stops; exits 1 if a worker cannot start."""
    supervisor = Supervisor(reactor, config, config_path, pick_ports(config))
    supervisor.start()
    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stop)
    install_signal(
        signal.SIGHUP,
        lambda signum, frame: reactor.callFromThread(supervisor.signal_all, signal.SIGHUP),
    )
    log.info(
        "gateway {name!r} {version} supervising {count} workers (nodes {node}-1..{count}); "
        "Ctrl-C or SIGTERM stops them",
        name=config.gateway.name,
        version=__version__,
        count=supervisor.count,
        node=supervisor.node,
    )
    code = await supervisor.failed
    await supervisor.stop()
    raise SystemExit(code)
