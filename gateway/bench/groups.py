"""The subscribers of one process, and of a child process driven over a pipe (``--procs``)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from gateway.bench.client import Client
from gateway.bench.clock import SECOND, now_ns
from gateway.bench.jsonlines import JsonClient
from gateway.bench.loop import Loop
from gateway.bench.options import WILDCARD
from gateway.bench.subscribers import DatagramClient, StreamClient, Subscriber, Tally

if TYPE_CHECKING:
    from gateway.bench.options import Options, Placement
    from gateway.bench.target import Target

ACCEPT_GRACE = 20_000_000
"""How long (ns) a plain TCP connection counts as unfinished after it connected."""
UDP_KEEPALIVE = 10 * SECOND


class SubscriberGroup:
    """The subscribers one process runs, from connect to the drain at the end."""

    def __init__(self, loop: Loop, plan: list[Placement], options: Options) -> None:
        self.loop = loop
        self.tallies: dict[str, Tally] = {}
        self.clients: list[Subscriber] = []
        for target, source, channel in plan:
            client = _subscriber(loop, target, source, channel, options, self.tallies)
            self.clients.append(client)
        self.streams = [c for c in self.clients if isinstance(c, StreamClient)]
        self.datagrams = [c for c in self.clients if isinstance(c, DatagramClient)]
        self.channels = options.channels
        # Stream subscribers by channel (the flood window), and those on every channel.
        self.by_channel: list[list[StreamClient]] = [[] for _ in range(self.channels)]
        self.wildcards: list[StreamClient] = []
        for stream in self.streams:
            if stream.channel == WILDCARD:
                self.wildcards.append(stream)
            else:
                self.by_channel[stream.channel].append(stream)
        self._lows = [0] * self.channels
        self._wild_low = 0
        self.published: list[int] = [0] * self.channels
        self._next = 0
        self._flight: deque[Subscriber] = deque()
        self._wake = 0
        self.in_flight = options.in_flight
        self.begun: dict[Subscriber, None] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self.cpu_marks: list[int] = []
        self.expected: int | None = None
        self.drain_deadline = 0
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
        if flight and flight[0].state == Client.READY and self._next < len(clients):
            # Nothing may wake the loop when the grace ends (hooks run after a poll): come
            # back then.
            wake = flight[0].ready_at + ACCEPT_GRACE + 1
            if wake != self._wake:
                self._wake = wake
                self.loop.call_at(wake, self._connect_more)

    def connected(self) -> bool:
        return self._next >= len(self.clients) and all(
            c.state >= Client.READY for c in self.clients
        )

    def synced(self) -> bool:
        return all(c.synced or c.state == Client.CLOSED for c in self.clients)

    def unsynced(self) -> set[int]:
        """The channels whose subscribers have not all seen a probe (-1: a wildcard one)."""
        return {c.channel for c in self.clients if not c.synced and c.state != Client.CLOSED}

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

    def lowest(self, channel: int, fresh: bool = False) -> int | None:
        """Fewest data messages a connected stream subscriber of ``channel`` has (None: none).

        Worked out again only when ``fresh``: counts only grow, so an old figure is a
        lower bound, and a window it shows open is open. A min() over a thousand
        subscribers on every turn of the loop would cost more than the reading.
        """
        if fresh:
            counts = [c.count for c in self.by_channel[channel] if c.state == Client.READY]
            self._lows[channel] = min(counts) if counts else -1
        low = self._lows[channel]
        return None if low < 0 else low

    def lowest_wildcard(self, fresh: bool = False) -> int | None:
        """Fewest data messages a connected wildcard subscriber has (None: there are none)."""
        if fresh:
            counts = [c.count for c in self.wildcards if c.state == Client.READY]
            self._wild_low = min(counts) if counts else -1
        return None if self._wild_low < 0 else self._wild_low

    def _expected(self, client: Subscriber) -> int:
        """What ``client`` should get: its channel's messages, or all for a wildcard one."""
        if self.expected is None:
            return 0
        return self.expected if client.channel == WILDCARD else self.published[client.channel]

    def expect(self, published: list[int], deadline: int) -> None:
        """Publishing ended after ``published`` data messages by channel: drain until ``deadline``."""
        self.published = list(published)
        self.expected = sum(published)
        self.drain_deadline = deadline

    def finished(self) -> bool:
        """Every subscriber has all it should get, or gives no more, or time is up."""
        if self.expected is None:
            return False
        now = self.loop.now
        if now >= self.drain_deadline:
            return True
        wanted = self._expected
        if any(c.count < wanted(c) and c.state == Client.READY for c in self.streams):
            return False
        received = sum(c.count for c in self.datagrams)
        if any(c.count < wanted(c) and c.state == Client.READY for c in self.datagrams):
            if received != self._progress[0]:
                self._progress = (received, now)
                return False
            return now - self._progress[1] > 300_000_000
        return True

    def result(self) -> dict[str, Any]:
        """What this group measured, per transport (picklable, to merge across processes)."""
        wanted = self._expected
        transports: dict[str, Any] = {}
        for transport, tally in self.tallies.items():
            clients = [c for c in self.clients if c.tally is tally]
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
                "expected": sum(wanted(c) for c in begun),
                "lost": sum(max(0, wanted(c) - c.count) for c in begun),
                "duplicated": sum(max(0, c.count - wanted(c)) for c in begun),
                "misordered": tally.misordered,
                "foreign": tally.foreign,
                "window_start": self.marks.get("start", {}).get(transport, 0),
                "window_end": self.marks.get("end", {}).get(transport, 0),
                "latencies": tally.latencies,
                "errors": errors[:5],
            }
        cpu = self.cpu_marks[-1] - self.cpu_marks[0] if len(self.cpu_marks) >= 2 else 0
        return {"transports": transports, "cpu_ns": cpu}


class RemoteGroup:
    """A ``SubscriberGroup`` in a child process, driven over a pipe."""

    def __init__(self, loop: Loop, plan: list[Placement], options: Options) -> None:
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

    def lowest(self, channel: int, fresh: bool = False) -> int | None:
        return None

    def lowest_wildcard(self, fresh: bool = False) -> int | None:
        return None

    def unsynced(self) -> set[int]:
        return set() if self.synced() else {0}

    def expect(self, published: list[int], deadline: int) -> None:
        self.pipe.send(("expect", (published, deadline)))

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


def _child_main(pipe: Connection, plan: list[Placement], options: Options) -> None:
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


def _subscriber(
    loop: Loop,
    target: Target,
    source: str | None,
    channel: int,
    options: Options,
    tallies: dict[str, Tally],
) -> Subscriber:
    """The client for one subscriber, counted in its kind's tally (tcp, json-tcp, wild-tcp...)."""
    size, channels = options.size, options.channels
    client: Subscriber
    if channel == WILDCARD:
        tally = tallies.setdefault(f"wild-{target.transport}", Tally())
        client = JsonClient(loop, target, tally, size, ">", options.unsubscribe, source, channel)
    elif options.subscribe:
        tally = tallies.setdefault(f"json-{target.transport}", Tally())
        pattern = options.name(options.subscribe, channel)
        client = JsonClient(
            loop, target, tally, size, pattern, options.unsubscribe, source, channel, channels
        )
    elif target.scheme == "dtls":
        from gateway.bench.dtls import DtlsSubscriber  # loads the DTLS engine: dtls:// only

        tally = tallies.setdefault(target.transport, Tally())
        client = DtlsSubscriber(loop, target, tally, size, source)
    elif target.lossy:
        client = DatagramClient(
            loop, target, tallies.setdefault(target.transport, Tally()), size, source
        )
    else:
        tally = tallies.setdefault(target.transport, Tally())
        subject = options.name(options.subject, channel)
        client = StreamClient(loop, target, tally, size, subject, source, channel, channels)
    return client
