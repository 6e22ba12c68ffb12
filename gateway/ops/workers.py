"""Worker processes on one host: what a worker is told, and how it runs.

With ``[gateway] workers = N`` the ``gateway`` command becomes a supervisor
(``gateway.ops.supervisor``): it starts N copies of itself (``--worker``),
each a full gateway node whose node id is ``<node>-<n>``. Every worker opens
every listener on its own socket with ``SO_REUSEPORT``, so the kernel spreads
new connections over the workers and keeps each UDP source on one worker;
the Redis backplane joins the workers like any other nodes.

A listener with ``port = 0`` gets its port picked once by the supervisor, so
all workers (and restarted ones) share that port.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import (
    Config,
    StreamListenerConfig,
    UdpListenerConfig,
)

log = Logger(namespace="gateway.workers")

READY_FD = 3
"""The worker writes to this descriptor once it listens (the supervisor's pipe)."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pick_ports(config: Config) -> dict[str, int]:
    """A free port for every ``port = 0`` listener, so all workers use the same one.

    The probe sockets are closed before the workers bind; another program
    could take a port in between (fixed ports avoid that).
    """
    probes: dict[str, socket.socket] = {}
    try:
        for listener in config.listeners:
            if listener.port != 0 or (
                isinstance(listener, StreamListenerConfig) and listener.endpoint is not None
            ):
                continue
            kind = (
                socket.SOCK_DGRAM if isinstance(listener, UdpListenerConfig) else socket.SOCK_STREAM
            )
            probe = socket.socket(_family(listener.host), kind)
            probes[listener.name] = probe
            probe.bind((listener.host, 0))
        return {name: probe.getsockname()[1] for name, probe in probes.items()}
    finally:
        for probe in probes.values():
            probe.close()


# A worker's view of the configuration


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells a worker (the hidden ``--worker`` argument)."""

    number: int
    node: str
    ports: dict[str, int]

    def argument(self) -> str:
        return json.dumps({"number": self.number, "node": self.node, "ports": self.ports})

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            int(data["number"]), str(data["node"]), {k: int(v) for k, v in data["ports"].items()}
        )


def worker_config(config: Config, spec: WorkerSpec) -> Config:
    """``config`` as worker ``spec.number`` runs it.

    Its node id is ``<node>-<n>``; picked ports replace ``port = 0``; a fixed
    admin port ``p`` becomes ``p + n - 1`` (each worker answers for itself).
    """
    listeners = tuple(
        replace(listener, port=spec.ports[listener.name])
        if listener.name in spec.ports
        else listener
        for listener in config.listeners
    )
    cluster = config.cluster
    if cluster is not None:
        cluster = replace(cluster, node=f"{spec.node}-{spec.number}")
    admin = config.admin
    if admin is not None and admin.port != 0:
        admin = replace(admin, port=admin.port + spec.number - 1)
    return replace(config, listeners=listeners, cluster=cluster, admin=admin)


def worker_started(reactor: Any) -> None:
    """In a worker that listens: tell the supervisor, and stop when it goes away.

    The worker also leaves the supervisor's process group, so a Ctrl-C in a
    terminal reaches only the supervisor, which then stops each worker once.
    """
    os.setpgrp()
    try:
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)
    except OSError as e:
        if e.errno != errno.EBADF:  # started by hand, without the supervisor's pipe
            raise
    watch = _ParentWatch(reactor)
    reactor.addReader(watch)
    reactor.addSystemEventTrigger("before", "shutdown", reactor.removeReader, watch)


@implementer(IReadDescriptor)
class _ParentWatch:
    """Standard input is the supervisor's pipe: end of input means it is gone."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Failure | None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return Failure(e)
        return None if data else Failure(EOFError("the supervisor closed standard input"))

    def connectionLost(self, reason: Failure) -> None:
        log.warn("worker: the supervisor is gone; stopping")
        if self.reactor.running:
            self.reactor.stop()
