"""One run of ``gateway bench``: connect, sync, load (or idle), drain, and the result."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.bench.churn import collect, spawn
from gateway.bench.client import Client
from gateway.bench.clock import SECOND, now_ns
from gateway.bench.groups import RemoteGroup, SubscriberGroup
from gateway.bench.loop import Loop, Ticker
from gateway.bench.options import Options, Placement
from gateway.bench.publisher import Publisher
from gateway.bench.report import si
from gateway.bench.server import ServerProbe
from gateway.bench.summary import summarize
from gateway.bench.target import BenchError
from gateway.bench.wire import PROBE

PROBE_INTERVAL = 20_000_000
PROBE_DELIVERIES = 20_000
"""Most probe deliveries per second while waiting for every subscriber to see one."""


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
        self.published_by = [0] * options.channels
        """Data messages published, by channel."""
        self.flooding = False
        self.marks: dict[str, dict[str, int]] = {}
        self.progress = sys.stdout.isatty() and not options.json
        self.wildcards = bool(options.wildcards)
        self._unpumped = False
        self.churn_result: dict[str, Any] | None = None
        self.memory: dict[str, dict[str, int]] = {}
        """--by-transport: each transport's peers, and what the server's RSS grew by."""

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
        return summarize(self, results, baseline_rss, connect_seconds)

    # Phases

    def _connect(self) -> None:
        """Connect the subscribers (with --by-transport, one transport after another and the
        server's memory read after each), then the publishers."""
        options = self.options
        deadline = now_ns() + int(options.connect_timeout * SECOND)
        plan = options.plan()
        parts: dict[str, list[Placement]] = {"": plan}
        if options.by_transport:
            parts = {}
            for placement in plan:
                parts.setdefault(placement[0].scheme, []).append(placement)
        measured = self.server if options.by_transport else None  # --by-transport needs --pid
        for transport, part in parts.items():
            before = measured.rss_bytes() if measured is not None else 0
            self._connect_part(part, transport or "subscribers", deadline)
            if measured is not None:
                self.loop.run_until(lambda: False, now_ns() + int(options.settle * SECOND))
                self.memory[transport] = {
                    "peers": len(part),
                    "rss_bytes": measured.rss_bytes() - before,
                }
        self.publishers = [self._publisher(number) for number in range(options.publishers)]
        for publisher in self.publishers:
            publisher.start()
        if not self.loop.run_until(
            lambda: all(p.state >= Client.READY for p in self.publishers), deadline
        ):
            raise BenchError(f"publishers not connected within {options.connect_timeout:g} s")
        failed = [p.error for p in self.publishers if p.error]
        if failed:
            raise BenchError(f"publisher failed: {failed[0]}")

    def _connect_part(self, part: list[Placement], what: str, deadline: int) -> None:
        """Connect these subscribers (over --procs processes) and wait until they are."""
        options = self.options
        procs = min(options.procs, len(part))
        if procs == 1:
            groups: list[SubscriberGroup | RemoteGroup] = [
                SubscriberGroup(self.loop, part, options)
            ]
        else:
            groups = [RemoteGroup(self.loop, part[i::procs], options) for i in range(procs)]
        self.groups.extend(groups)
        for group in groups:
            group.start()
        self._status(f"connecting {what}")
        if not self.loop.run_until(lambda: all(g.connected() for g in groups), deadline):
            raise BenchError(f"subscribers not connected within {options.connect_timeout:g} s")

    def _publisher(self, number: int) -> Publisher:
        options = self.options
        channel = number % options.channels
        publish_to = options.publish_to
        return Publisher(
            self.loop,
            options.pub,
            number,
            options.size,
            options.name(options.subject, channel),
            channel,
            options.name(publish_to, channel) if publish_to is not None else None,
            options.unsubscribe,
            options.block,
        )

    def _sync(self) -> None:
        """Probe until every subscriber has seen a probe: all are attached and reachable.

        Each channel's first publisher probes while a subscriber of its channel
        has seen none (channel 0's, for wildcard subscribers).
        """
        options = self.options
        first = self.publishers[: options.channels]

        def probe(ticks: int) -> None:
            unsynced: set[int] = set()
            for group in self.groups:
                unsynced |= group.unsynced()
            for channel in sorted(unsynced):
                first[max(channel, 0)].publish_one(PROBE)

        # Each probe reaches every subscriber of a channel: keep probing far below what
        # is measured.
        interval = max(PROBE_INTERVAL, options.subscribers * SECOND // PROBE_DELIVERIES)
        ticker = Ticker(self.loop, interval, probe)
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
        churn = spawn(options.churn_specs, start, end) if options.churn else None
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
                    self.published_by[publisher.channel] += 1

            ticker = Ticker(loop, int(SECOND / options.rate), tick)
        else:
            self.flooding = True
            self._unpumped = True
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
            group.expect(self.published_by, drain)
        loop.run_until(lambda: all(g.finished() for g in self.groups), drain + 2 * SECOND)
        if churn is not None:
            self._churned(churn)

    def _churned(self, churn: subprocess.Popen[str]) -> None:
        """What the churn saw, and the server's memory ``--settle`` seconds after it."""
        self.churn_result = {"targets": collect(churn)}
        if self.server is not None:
            time.sleep(self.options.settle)
            self.churn_result["rss_after_bytes"] = self.server.rss_bytes()

    # Flood

    def _window_open(self, channel: int) -> bool:
        """Whether a publisher of ``channel`` may send a block: no subscriber of the channel
        (nor a wildcard one, against all that was published) is too far behind."""
        limit = self.options.window - self.options.block
        if not self._within(
            lambda g, fresh: g.lowest(channel, fresh), self.published_by[channel], limit
        ):
            return False
        return not self.wildcards or self._within(
            lambda g, fresh: g.lowest_wildcard(fresh), self.published, limit
        )

    def _within(
        self,
        lowest: Callable[[SubscriberGroup | RemoteGroup, bool], int | None],
        published: int,
        limit: int,
    ) -> bool:
        """Whether ``published`` is at most ``limit`` ahead of the ``lowest`` count, as last
        worked out or (when it seems not) as it is now."""
        for fresh in (False, True):
            known = [low for low in (lowest(g, fresh) for g in self.groups) if low is not None]
            if not known or published - min(known) <= limit:
                return True
        return False

    def _can_send(self) -> bool:
        """Whether the loop must not sleep: a flood that has not been pumped yet.

        After each pump every publisher is blocked, by its socket (which wakes
        the loop when writable) or by its window (which the subscribers' reads,
        also events of the loop, open again), so nothing else keeps it awake.
        """
        return self.flooding and self._unpumped

    def _pump(self) -> None:
        if not self.flooding:
            return
        self._unpumped = False
        published_by = self.published_by
        for publisher in self.publishers:
            channel = publisher.channel
            while publisher.state == Client.READY and not publisher.out:
                if not self._window_open(channel):
                    break
                sent = publisher.publish_block()
                self.published += sent
                published_by[channel] += sent

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
            f"published {si(sent)}/s  delivered {si(rate)}/s   "
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
