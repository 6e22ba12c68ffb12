"""``gateway bench``: a load generator for the gateway (and for servers it is compared with).

N subscribers spread over the given URLs (tcp, tls, udp, ws, wss, and nats or
nats+ws for nats-server), M publishers, fixed-size messages, flood or
fixed-rate. Each message carries its publisher, a sequence number and its
send time (CLOCK_MONOTONIC, shared by all processes of a machine), so the
bench reports deliveries per second, loss and latency percentiles; given the
server's PID, also the server's CPU and memory from ``/proc``.

A run: connect the subscribers; connect the publishers; publisher 0 sends
probe messages until every subscriber has seen one (so everyone is attached
before anything is counted); then data for the warm-up plus the measured
window; then the publishers stop and the subscribers drain. Loss is what a
subscriber that was connected from the start did not receive by the end.

Flood mode is closed-loop: publishers stay at most ``--window`` messages ahead
of the slowest stream subscriber, so the server runs at its maximum without
slow-consumer policies kicking in. In flood mode, latency is sampled from the
last whole message of each chunk read (a subset); at a fixed rate every
message is parsed (latency and sequence of each).

The generator pins itself to one CPU (the last one by default) so that the
server can have the other; it is one process with an epoll loop, or, with
``--procs``, several such processes sharing the subscribers.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from gateway.benchproto import (
    BLOCK,
    HEADER_SIZE,
    PROBE,
    BenchError,
    Client,
    DatagramClient,
    Loop,
    Publisher,
    StreamClient,
    Subscriber,
    Tally,
    Target,
    Ticker,
    now_ns,
)

SECOND = 1_000_000_000
CONNECTS_IN_FLIGHT = 32
"""Connections started but not finished at once, over all processes (listen backlogs are small)."""
ACCEPT_GRACE = 20_000_000
"""How long (ns) a plain TCP connection counts as unfinished after it connected."""
PROBE_INTERVAL = 20_000_000
PROBE_DELIVERIES = 20_000
"""Most probe deliveries per second while waiting for every subscriber to see one."""
UDP_KEEPALIVE = 10 * SECOND


# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gateway bench``."""
    parser.add_argument(
        "--sub",
        action="append",
        metavar="URL",
        required=True,
        help="where subscribers connect; repeat to spread them over several URLs: "
        "tcp://, tls://, udp://, ws://HOST:PORT/ws, wss://, nats:// (nats-server), "
        "nats+ws://HOST:PORT/ (nats-server's WebSocket)",
    )
    parser.add_argument(
        "-n", "--subscribers", type=int, default=10, help="subscribers in all (default 10)"
    )
    parser.add_argument(
        "--pub",
        metavar="URL",
        help="where publishers connect (default: the first tcp, tls or nats --sub URL)",
    )
    parser.add_argument("-m", "--publishers", type=int, default=1, help="publishers (default 1)")
    parser.add_argument(
        "--size", type=int, default=100, help=f"payload bytes per message, >= {HEADER_SIZE}"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="MSGS",
        help="messages per second over all publishers; 0 = flood (default)",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=2000,
        help="flood: most messages published ahead of the slowest stream subscriber (default 2000)",
    )
    parser.add_argument(
        "--idle", action="store_true", help="no load: connect, probe, measure memory"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="idle: seconds to wait before reading memory"
    )
    parser.add_argument("--pid", type=int, help="the server's PID: report its CPU and memory")
    parser.add_argument(
        "--cpu",
        default="auto",
        help="CPU to pin the generator to (default: the last one, when there are several; 'none')",
    )
    parser.add_argument(
        "--ca", metavar="PEM", help="tls, wss: trust this CA (default: the system's)"
    )
    parser.add_argument("--subject", default="bench", help="NATS subject (default bench)")
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="client processes sharing the subscribers (fixed rate or idle only)",
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=0,
        metavar="N",
        help="spread subscribers over N source addresses 127.0.0.2, 127.0.0.3, ... (IPv4 loopback)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to connect and sync (60)"
    )
    parser.add_argument(
        "--drain", type=float, default=5.0, help="most seconds to wait for late messages (5)"
    )
    parser.add_argument(
        "--sample",
        choices=("auto", "chunk", "all"),
        default="auto",
        help="latency from the last message of each read (chunk) or every message (all); "
        "auto = chunk when flooding, all at a fixed rate",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run ``gateway bench`` with parsed arguments; returns the exit status."""
    try:
        options = Options.from_args(args)
        result = Bench(options).run()
    except BenchError as e:
        sys.stderr.write(f"gateway bench: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    if options.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        sys.stdout.write(describe(result) + "\n")
    return 0 if result["ok"] else 1


class Options:
    """Validated settings of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.subs = [Target.parse(url) for url in args.sub]
        if args.pub:
            self.pub = Target.parse(args.pub)
        else:
            fallback = [t for t in self.subs if t.scheme in ("tcp", "tls", "nats")]
            if not fallback:
                raise BenchError("give --pub URL: no tcp, tls or nats --sub URL to publish to")
            self.pub = fallback[0]
        self.subscribers = args.subscribers
        self.publishers = args.publishers
        self.size = args.size
        self.rate = args.rate
        self.duration = args.duration
        self.warmup = args.warmup
        self.window = args.window
        self.idle = args.idle
        self.settle = args.settle
        self.pid = args.pid
        self.cpu = _cpu(args.cpu)
        self.ca = args.ca
        self.subject = args.subject
        self.procs = args.procs
        self.sources = args.sources
        self.connect_timeout = args.connect_timeout
        self.drain = args.drain
        self.json = args.json
        self.in_flight = max(4, CONNECTS_IN_FLIGHT // self.procs)
        sample = args.sample
        if sample == "auto":
            sample = "all" if self.rate > 0 else "chunk"
        self.parse_all = sample == "all"
        if self.subscribers < 1 or self.publishers < 1:
            raise BenchError("--subscribers and --publishers must be at least 1")
        if self.size < HEADER_SIZE or (self.size > 65506 and any(t.lossy for t in self.subs)):
            raise BenchError(f"--size must be {HEADER_SIZE}-65506 (udp) or more (streams)")
        if self.rate < 0 or self.duration <= 0 or self.warmup < 0:
            raise BenchError("--rate, --duration and --warmup must be positive")
        if self.procs < 1:
            raise BenchError("--procs must be at least 1")
        if self.procs > 1 and self.rate == 0 and not self.idle:
            raise BenchError("flood mode runs in one process (it watches every subscriber)")
        if self.sources and not all(_loopback4(t.host) for t in self.subs):
            raise BenchError("--sources needs IPv4 loopback targets (127.x.y.z)")
        if self.pid is not None and not Path(f"/proc/{self.pid}").exists():
            raise BenchError(f"--pid {self.pid}: no such process")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(args)

    @property
    def mode(self) -> str:
        if self.idle:
            return "idle"
        return "rate" if self.rate > 0 else "flood"

    def plan(self) -> list[tuple[Target, str | None]]:
        """Each subscriber's target and source address, round-robin over the --sub URLs."""
        plan = []
        for i in range(self.subscribers):
            source = f"127.0.0.{2 + i % self.sources}" if self.sources else None
            plan.append((self.subs[i % len(self.subs)], source))
        return plan

    def summary(self) -> dict[str, Any]:
        return {
            "subs": [str(t) for t in self.subs],
            "pub": str(self.pub),
            "subscribers": self.subscribers,
            "publishers": self.publishers,
            "size": self.size,
            "mode": self.mode,
            "rate": self.rate,
            "duration": self.duration,
            "warmup": self.warmup,
            "window": self.window,
            "procs": self.procs,
            "sources": self.sources,
            "cpu": self.cpu,
            "sample": "all" if self.parse_all else "chunk",
        }


def _cpu(value: str) -> int | None:
    allowed = sorted(os.sched_getaffinity(0))
    if value == "none":
        return None
    if value == "auto":
        return allowed[-1] if len(allowed) > 1 else None
    try:
        cpu = int(value)
    except ValueError:
        raise BenchError(f"--cpu {value!r}: expected a CPU number, auto or none") from None
    if cpu not in allowed:
        raise BenchError(f"--cpu {cpu}: not one of this process's CPUs {allowed}")
    return cpu


def _loopback4(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.version == 4 and address.is_loopback


# The server under test, seen through /proc


class ServerProbe:
    """CPU time (all threads) and resident memory of a process, from ``/proc``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_ns(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with (
                    contextlib.suppress(FileNotFoundError, ProcessLookupError),
                    open(f"/proc/{self.pid}/task/{task}/schedstat") as f,
                ):
                    total += int(f.read().split()[0])
        return total

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


# Subscribers of one process


class SubscriberGroup:
    """The subscribers one process runs, from connect to the drain at the end."""

    def __init__(self, loop: Loop, plan: list[tuple[Target, str | None]], options: Options) -> None:
        self.loop = loop
        self.tallies: dict[str, Tally] = {}
        self.clients: list[Subscriber] = []
        for target, source in plan:
            tally = self.tallies.setdefault(target.transport, Tally())
            client: Subscriber
            if target.lossy:
                client = DatagramClient(loop, target, tally, options.size, source)
            else:
                client = StreamClient(loop, target, tally, options.size, options.subject, source)
            self.clients.append(client)
        self.streams = [c for c in self.clients if isinstance(c, StreamClient)]
        self.datagrams = [c for c in self.clients if isinstance(c, DatagramClient)]
        self._next = 0
        self._flight: deque[Subscriber] = deque()
        self.in_flight = options.in_flight
        self.begun: dict[Subscriber, None] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self.cpu_marks: list[int] = []
        self.expected: int | None = None
        self.drain_deadline = 0
        self._lowest = 0
        self._lowest_at = 0
        self._progress = (0, 0)
        if self.datagrams:
            loop.call_at(now_ns() + UDP_KEEPALIVE, self._keepalive)

    # Connecting

    def start(self) -> None:
        self.loop.hooks.append(self._connect_more)
        self._connect_more()

    def _connect_more(self) -> None:
        """Start connections while few are unfinished.

        Listen backlogs can be small (Twisted's default is 50), and with SYN
        cookies a connection that overflows one is lost without the client
        knowing. A plain TCP connection tells nothing when the server accepts
        it, so it counts as unfinished for a short while after connecting.
        """
        clients = self.clients
        if self._next >= len(clients):
            return
        now = self.loop.now
        flight = self._flight
        while flight and (
            flight[0].state == Client.CLOSED
            or (flight[0].state == Client.READY and now - flight[0].ready_at > ACCEPT_GRACE)
        ):
            flight.popleft()
        while len(flight) < self.in_flight and self._next < len(clients):
            client = clients[self._next]
            client.start()
            flight.append(client)
            self._next += 1

    def connected(self) -> bool:
        return self._next >= len(self.clients) and all(
            c.state >= Client.READY for c in self.clients
        )

    def synced(self) -> bool:
        return all(c.synced or c.state == Client.CLOSED for c in self.clients)

    def _keepalive(self) -> None:
        for client in self.datagrams:
            client.keepalive()
        self.loop.call_at(now_ns() + UDP_KEEPALIVE, self._keepalive)

    # Measuring

    def begin(self, start: int, end: int) -> None:
        """Data flows from now on: measure between the monotonic times ``start`` and ``end``."""
        self.begun = {c: None for c in self.clients if c.state == Client.READY}
        self.loop.call_at(start, lambda: self._mark("start", True))
        self.loop.call_at(end, lambda: self._mark("end", False))

    def _mark(self, name: str, measuring: bool) -> None:
        self.loop.measuring = measuring
        self.marks[name] = {transport: t.count for transport, t in self.tallies.items()}
        self.cpu_marks.append(time.process_time_ns())

    def lowest(self, fresh: bool = False) -> int | None:
        """Fewest data messages any connected stream subscriber has (None: there are none).

        Cached for half a millisecond unless ``fresh``: a min() over a thousand
        subscribers on every turn of the loop would cost more than the reading.
        """
        now = self.loop.now
        if fresh or now - self._lowest_at > 500_000:
            counts = [c.count for c in self.streams if c.state == Client.READY]
            self._lowest = min(counts) if counts else -1
            self._lowest_at = now
        return None if self._lowest < 0 else self._lowest

    def expect(self, total: int, deadline: int) -> None:
        """Publishing ended after ``total`` data messages: drain until ``deadline`` at most."""
        self.expected = total
        self.drain_deadline = deadline

    def finished(self) -> bool:
        """Every subscriber has all it should get, or gives no more, or time is up."""
        if self.expected is None:
            return False
        now = self.loop.now
        if now >= self.drain_deadline:
            return True
        total = self.expected
        if any(c.count < total and c.state == Client.READY for c in self.streams):
            return False
        received = sum(c.count for c in self.datagrams)
        if any(c.count < total and c.state == Client.READY for c in self.datagrams):
            if received != self._progress[0]:
                self._progress = (received, now)
                return False
            return now - self._progress[1] > 300_000_000
        return True

    def result(self) -> dict[str, Any]:
        """What this group measured, per transport (picklable, to merge across processes)."""
        expected = self.expected or 0
        transports: dict[str, Any] = {}
        for transport, tally in self.tallies.items():
            clients = [c for c in self.clients if c.target.transport == transport]
            begun = [c for c in clients if c in self.begun]
            errors = sorted({c.error for c in clients if c.error})
            transports[transport] = {
                "subscribers": len(clients),
                "connected": sum(1 for c in clients if c in self.begun or c.state == Client.READY),
                "failed": sum(
                    1 for c in clients if c not in self.begun and c.state != Client.READY
                ),
                "begun": len(begun),
                "disconnected": sum(1 for c in begun if c.state == Client.CLOSED),
                "received": tally.count,
                "lost": sum(max(0, expected - c.count) for c in begun),
                "duplicated": sum(max(0, c.count - expected) for c in begun),
                "misordered": tally.misordered,
                "window_start": self.marks.get("start", {}).get(transport, 0),
                "window_end": self.marks.get("end", {}).get(transport, 0),
                "latencies": tally.latencies,
                "errors": errors[:5],
            }
        cpu = self.cpu_marks[-1] - self.cpu_marks[0] if len(self.cpu_marks) >= 2 else 0
        return {"transports": transports, "cpu_ns": cpu}


# Several client processes


class RemoteGroup:
    """A ``SubscriberGroup`` in a child process, driven over a pipe."""

    def __init__(self, loop: Loop, plan: list[tuple[Target, str | None]], options: Options) -> None:
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        self.pipe = parent
        self.process = context.Process(target=_child_main, args=(child, plan, options), daemon=True)
        self.process.start()
        child.close()
        self.state: dict[str, Any] = {}
        loop.register_fd(parent.fileno(), self._readable)

    def _readable(self, events: int) -> None:
        try:
            while self.pipe.poll():
                kind, value = self.pipe.recv()
                self.state[kind] = value
        except (EOFError, OSError):
            self.state.setdefault("result", {"transports": {}, "cpu_ns": 0, "died": True})

    def start(self) -> None:
        pass  # the child connects as soon as it starts

    def connected(self) -> bool:
        return "connected" in self.state or "result" in self.state

    def synced(self) -> bool:
        return "synced" in self.state or "result" in self.state

    def begin(self, start: int, end: int) -> None:
        self.pipe.send(("begin", (start, end)))

    def lowest(self, fresh: bool = False) -> int | None:
        return None

    def expect(self, total: int, deadline: int) -> None:
        self.pipe.send(("expect", (total, deadline)))

    def finished(self) -> bool:
        return "result" in self.state

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = self.state.get("result", {"transports": {}, "cpu_ns": 0})
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(("stop", None))
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()


def _child_main(pipe: Connection, plan: list[tuple[Target, str | None]], options: Options) -> None:
    loop = Loop(ca=options.ca)
    loop.parse_all = options.parse_all
    group = SubscriberGroup(loop, plan, options)
    commands: dict[str, Any] = {}

    def readable(events: int) -> None:
        try:
            while pipe.poll():
                kind, value = pipe.recv()
                commands[kind] = value
                if kind == "begin":
                    group.begin(*value)
                elif kind == "expect":
                    group.expect(*value)
        except EOFError:
            commands["stop"] = None

    loop.register_fd(pipe.fileno(), readable)
    group.start()
    forever = now_ns() + 24 * 3600 * SECOND
    loop.run_until(lambda: group.connected() or "stop" in commands, forever)
    pipe.send(("connected", True))
    loop.run_until(lambda: group.synced() or "stop" in commands, forever)
    pipe.send(("synced", True))
    loop.run_until(lambda: group.finished() or "stop" in commands, forever)
    result = group.result()
    result["transports"] = {
        name: {**value, "latencies": value["latencies"].tobytes()}
        for name, value in result["transports"].items()
    }
    pipe.send(("result", result))
    loop.run_until(lambda: "stop" in commands, now_ns() + 10 * SECOND)
    for client in group.clients:
        client.close()
    os._exit(0)


# A run


class Bench:
    """One run of ``gateway bench``."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.loop = Loop(ca=options.ca)
        self.loop.parse_all = options.parse_all
        self.server = ServerProbe(options.pid) if options.pid is not None else None
        self.publishers: list[Publisher] = []
        self.groups: list[SubscriberGroup | RemoteGroup] = []
        self.published = 0
        self.flooding = False
        self.marks: dict[str, dict[str, int]] = {}
        self.progress = sys.stdout.isatty() and not options.json

    def run(self) -> dict[str, Any]:
        options = self.options
        if options.cpu is not None:
            os.sched_setaffinity(0, {options.cpu})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        server = self.server
        baseline_rss = server.rss_bytes() if server is not None else None
        started = now_ns()
        try:
            self._connect()
            connect_seconds = (now_ns() - started) / SECOND
            self._sync()
            if options.idle:
                self._settle()
            else:
                self._load()
            results = [group.result() for group in self.groups]
        finally:
            self._close()
        return self._report(results, baseline_rss, connect_seconds)

    # Phases

    def _connect(self) -> None:
        options = self.options
        plan = options.plan()
        procs = min(options.procs, len(plan))
        if procs == 1:
            self.groups = [SubscriberGroup(self.loop, plan, options)]
        else:
            self.groups = [RemoteGroup(self.loop, plan[i::procs], options) for i in range(procs)]
        for group in self.groups:
            group.start()
        deadline = now_ns() + int(options.connect_timeout * SECOND)
        self._status("connecting subscribers")
        if not self.loop.run_until(lambda: all(g.connected() for g in self.groups), deadline):
            raise BenchError(f"subscribers not connected within {options.connect_timeout:g} s")
        self.publishers = [
            Publisher(self.loop, options.pub, number, options.size, options.subject)
            for number in range(options.publishers)
        ]
        for publisher in self.publishers:
            publisher.start()
        if not self.loop.run_until(
            lambda: all(p.state >= Client.READY for p in self.publishers), deadline
        ):
            raise BenchError(f"publishers not connected within {options.connect_timeout:g} s")
        failed = [p.error for p in self.publishers if p.error]
        if failed:
            raise BenchError(f"publisher failed: {failed[0]}")

    def _sync(self) -> None:
        """Probe until every subscriber has seen a probe: all are attached and reachable."""
        options = self.options
        probe = self.publishers[0]
        # Each probe reaches every subscriber: keep probing far below what is measured.
        interval = max(PROBE_INTERVAL, options.subscribers * SECOND // PROBE_DELIVERIES)
        ticker = Ticker(self.loop, interval, lambda n: probe.publish_one(PROBE))
        deadline = now_ns() + int(options.connect_timeout * SECOND)
        self._status("probing")
        synced = self.loop.run_until(lambda: all(g.synced() for g in self.groups), deadline)
        ticker.stop()
        if not synced:
            raise BenchError(
                f"not every subscriber received a probe within {options.connect_timeout:g} s"
            )
        # Let probes still in flight arrive before data starts.
        self.loop.run_until(lambda: False, now_ns() + 100_000_000)

    def _settle(self) -> None:
        self._status("settling")
        self.loop.run_until(lambda: False, now_ns() + int(self.options.settle * SECOND))
        self.marks["idle"] = self._server_mark()

    def _load(self) -> None:
        options = self.options
        loop = self.loop
        begin = now_ns()
        start = begin + int(options.warmup * SECOND)
        end = start + int(options.duration * SECOND)
        for group in self.groups:
            group.begin(start, end)
        loop.call_at(start, lambda: self._mark("start"))
        loop.call_at(end, lambda: self._mark("end"))
        ticker: Ticker | None = None
        if options.rate > 0:
            publishers = self.publishers
            turn = [0]

            def tick(due: int) -> None:
                for _ in range(min(due, 1000)):
                    publisher = publishers[turn[0] % len(publishers)]
                    turn[0] += 1
                    publisher.publish_one()
                    self.published += 1

            ticker = Ticker(loop, int(SECOND / options.rate), tick)
        else:
            self.flooding = True
            loop.hooks.append(self._pump)
            loop.busy = self._can_send
        if self.progress:
            loop.call_at(begin + SECOND, lambda: self._show_progress(begin, end))
        loop.run_until(lambda: False, end)
        self.flooding = False
        loop.busy = None
        if ticker is not None:
            ticker.stop()
        if self.progress:
            sys.stdout.write("\r" + " " * 78 + "\r")
            sys.stdout.flush()
        drain = now_ns() + int(options.drain * SECOND)
        for group in self.groups:
            group.expect(self.published, drain)
        loop.run_until(lambda: all(g.finished() for g in self.groups), drain + 2 * SECOND)

    # Flood

    def _lowest(self, fresh: bool = False) -> int | None:
        lows = [g.lowest(fresh) for g in self.groups]
        known = [low for low in lows if low is not None]
        return min(known) if known else None

    def _window_open(self) -> bool:
        limit = self.options.window - BLOCK
        lowest = self._lowest()
        if lowest is None or self.published - lowest <= limit:
            return True
        lowest = self._lowest(fresh=True)
        return lowest is None or self.published - lowest <= limit

    def _can_send(self) -> bool:
        if not self.flooding:
            return False
        return self._window_open() and any(
            not p.out and p.state == Client.READY for p in self.publishers
        )

    def _pump(self) -> None:
        if not self.flooding:
            return
        for publisher in self.publishers:
            while publisher.state == Client.READY and not publisher.out:
                if not self._window_open():
                    return
                self.published += publisher.publish_block()

    # Marks and progress

    def _server_mark(self) -> dict[str, int]:
        mark = {"time": now_ns(), "published": self.published, "cpu": time.process_time_ns()}
        if self.server is not None:
            mark["server_cpu"] = self.server.cpu_ns()
            mark["server_rss"] = self.server.rss_bytes()
        return mark

    def _mark(self, name: str) -> None:
        self.marks[name] = self._server_mark()

    def _show_progress(self, begin: int, end: int) -> None:
        now = now_ns()
        if now >= end:
            return
        received = sum(
            t.count
            for g in self.groups
            if isinstance(g, SubscriberGroup)
            for t in g.tallies.values()
        )
        last = getattr(self, "_last_progress", (begin, 0, 0))
        seconds = (now - last[0]) / SECOND
        rate = (received - last[1]) / seconds if seconds else 0
        sent = (self.published - last[2]) / seconds if seconds else 0
        phase = "warm-up" if "start" not in self.marks else "measuring"
        line = (
            f"\r{phase}: {(now - begin) / SECOND:5.1f} s  "
            f"published {_si(sent)}/s  delivered {_si(rate)}/s   "
        )
        sys.stdout.write(line)
        sys.stdout.flush()
        self._last_progress = (now, received, self.published)
        self.loop.call_at(now + SECOND, lambda: self._show_progress(begin, end))

    def _status(self, text: str) -> None:
        if self.progress:
            sys.stdout.write("\r" + text + "..." + " " * 40)
            sys.stdout.flush()

    def _close(self) -> None:
        for publisher in self.publishers:
            publisher.close()
        for group in self.groups:
            if isinstance(group, RemoteGroup):
                group.close()
            else:
                for client in group.clients:
                    client.close()
        self.loop.close()
        if self.progress:
            sys.stdout.write("\r" + " " * 78 + "\r")
            sys.stdout.flush()

    # Report

    def _report(
        self, results: list[dict[str, Any]], baseline_rss: int | None, connect_seconds: float
    ) -> dict[str, Any]:
        options = self.options
        merged: dict[str, dict[str, Any]] = {}
        for group_result in results:
            for transport, part in group_result["transports"].items():
                latencies = part["latencies"]
                if isinstance(latencies, bytes):
                    from array import array

                    values = array("q")
                    values.frombytes(latencies)
                    latencies = values
                into = merged.setdefault(transport, {"latencies": [], "errors": []})
                for key, value in part.items():
                    if key == "latencies":
                        into["latencies"].append(latencies)
                    elif key == "errors":
                        into["errors"].extend(value)
                    else:
                        into[key] = into.get(key, 0) + value
        start, end = self.marks.get("start"), self.marks.get("end")
        window = (end["time"] - start["time"]) / SECOND if start and end else 0.0
        transports: dict[str, Any] = {}
        all_latencies: list[Iterable[int]] = []
        delivered = 0
        for transport, part in sorted(merged.items()):
            in_window = part["window_end"] - part["window_start"]
            delivered += in_window
            all_latencies.extend(part["latencies"])
            transports[transport] = {
                "subscribers": part["subscribers"],
                "connected": part["connected"],
                "failed": part["failed"],
                "disconnected": part["disconnected"],
                "delivered_per_second": in_window / window if window else 0.0,
                "received": part["received"],
                "lost": part["lost"],
                "duplicated": part["duplicated"],
                "misordered": part["misordered"],
                "latency_ms": _percentiles(part["latencies"]),
                "errors": sorted(set(part["errors"]))[:5],
            }
        lost = sum(t["lost"] for t in transports.values())
        expected = self.published * sum(part["begun"] for part in merged.values())
        result: dict[str, Any] = {
            "tool": "gateway bench",
            "options": options.summary(),
            "connect_seconds": round(connect_seconds, 3),
            "window_seconds": round(window, 4),
            "published": self.published,
            "published_per_second": (end["published"] - start["published"]) / window
            if start and end and window
            else 0.0,
            "delivered_per_second": delivered / window if window else 0.0,
            "expected": expected,
            "lost": lost,
            "loss_ratio": lost / expected if expected else 0.0,
            "latency_ms": _percentiles(all_latencies),
            "transports": transports,
        }
        client_cpu = (end["cpu"] - start["cpu"]) if start and end else 0
        client_cpu += sum(r.get("cpu_ns", 0) for r in results if len(self.groups) > 1)
        result["client"] = {
            "cpu_percent": 100.0 * client_cpu / (window * SECOND) if window else 0.0,
            "processes": len(self.groups) + (1 if len(self.groups) > 1 else 0),
        }
        if self.server is not None:
            server: dict[str, Any] = {"pid": self.server.pid, "rss_baseline_bytes": baseline_rss}
            if start and end and window:
                cpu = end["server_cpu"] - start["server_cpu"]
                server["cpu_percent"] = 100.0 * cpu / (window * SECOND)
                server["cpu_ns_per_delivery"] = cpu / delivered if delivered else None
                server["rss_bytes"] = end["server_rss"]
            idle = self.marks.get("idle")
            if idle is not None:
                peers = sum(t["connected"] for t in transports.values())
                server["rss_bytes"] = idle["server_rss"]
                assert baseline_rss is not None
                server["rss_per_peer_bytes"] = (
                    (idle["server_rss"] - baseline_rss) / peers if peers else None
                )
            result["server"] = server
        failed = sum(t["failed"] for t in transports.values())
        result["ok"] = failed == 0 and all(t["disconnected"] == 0 for t in transports.values())
        return result


def _percentiles(parts: Iterable[Iterable[int]]) -> dict[str, Any]:
    values = sorted(v for part in parts for v in part)
    if not values:
        return {"samples": 0, "p50": None, "p99": None, "p999": None, "max": None}

    def at(q: float) -> float:
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] / 1e6

    return {
        "samples": len(values),
        "p50": at(0.50),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": values[-1] / 1e6,
    }


def _si(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.2f}{suffix}"
    return f"{value:.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe(result: dict[str, Any]) -> str:
    """The result as a few lines for a person."""
    options = result["options"]
    mode = {
        "flood": "flood",
        "rate": f"{options['rate']:g} msgs/s",
        "idle": "idle",
    }[options["mode"]]
    transports = result["transports"]
    spread = ", ".join(f"{name} {t['subscribers']}" for name, t in transports.items())
    lines = [
        f"gateway bench: {options['subscribers']} subscribers ({spread}), "
        f"{options['publishers']} publisher(s) on {options['pub']}, "
        f"{options['size']}-byte messages, {mode}",
    ]
    if options["mode"] != "idle":
        latency = result["latency_ms"]
        lines += [
            f"  delivered  {_si(result['delivered_per_second'])} msgs/s over "
            f"{result['window_seconds']:.2f} s (published {_si(result['published_per_second'])}/s)",
            f"  loss       {result['lost']} of {result['expected']} "
            f"({100 * result['loss_ratio']:.4f}%)",
            f"  latency    p50 {_ms(latency['p50'])} ms  p99 {_ms(latency['p99'])} ms  "
            f"p99.9 {_ms(latency['p999'])} ms  ({latency['samples']} samples)",
        ]
    for name, t in transports.items():
        latency = t["latency_ms"]
        extra = f"  failed {t['failed']}" if t["failed"] else ""
        extra += f"  disconnected {t['disconnected']}" if t["disconnected"] else ""
        lines.append(
            f"  {name:8} {t['connected']:6} connected  {_si(t['delivered_per_second']):>8} msgs/s  "
            f"lost {t['lost']}  p50/p99 {_ms(latency['p50'])}/{_ms(latency['p99'])} ms{extra}"
        )
        for error in t["errors"]:
            lines.append(f"           {error}")
    server = result.get("server")
    if server is not None:
        text = f"  server     pid {server['pid']}"
        if "cpu_percent" in server:
            per = server.get("cpu_ns_per_delivery")
            text += f": CPU {server['cpu_percent']:.1f}%"
            if per is not None:
                text += f", {per:.0f} ns per delivery"
        if server.get("rss_bytes"):
            text += f", RSS {server['rss_bytes'] / 2**20:.1f} MiB"
        if server.get("rss_per_peer_bytes") is not None:
            text += f" ({server['rss_per_peer_bytes'] / 1024:.2f} KiB per peer above baseline)"
        lines.append(text)
    lines.append(f"  client     CPU {result['client']['cpu_percent']:.0f}%")
    return "\n".join(lines)
