"""The command line of ``gateway bench``: its options, and the validated settings of a run."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any

from gateway.bench.churn import parse_churn
from gateway.bench.publisher import BLOCK
from gateway.bench.target import BenchError, Target
from gateway.bench.wire import HEADER_SIZE

CONNECTS_IN_FLIGHT = 32
"""Connections started but not finished at once, over all processes (listen backlogs are small)."""
WILDCARD = -1
"""The channel number of a --wildcard subscriber: it is on every channel."""

BLOCKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Block sizes a publisher can make (they divide 256: see ``publisher._block_templates``)."""

Placement = tuple[Target, str | None, int]
"""Where one subscriber connects: its target, source address (or None) and channel number."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gateway bench``."""
    parser.add_argument(
        "--sub",
        action="append",
        metavar="URL",
        required=True,
        help="where subscribers connect; repeat to spread them over several URLs: "
        "tcp://, tls://, udp://, dtls://, ws://HOST:PORT/ws, wss://, nats:// (nats-server), "
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
        help="flood: most messages a publisher is ahead of the slowest stream subscriber of its "
        "channel (default 2000)",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=BLOCK,
        help=f"flood: messages per write of a publisher, one of {', '.join(map(str, BLOCKS))} "
        f"(default {BLOCK})",
    )
    parser.add_argument(
        "--idle", action="store_true", help="no load: connect, probe, measure memory"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="idle: seconds to wait before reading memory"
    )
    parser.add_argument(
        "--pid",
        type=int,
        help="the server's PID: report its CPU and memory (with every process under it, e.g. "
        "the workers of a supervisor)",
    )
    parser.add_argument(
        "--by-transport",
        action="store_true",
        help="connect the subscribers one transport (URL scheme) after another, --settle "
        "seconds apart, and report the server's memory per peer of each (needs --pid)",
    )
    parser.add_argument(
        "--cpu",
        default="auto",
        help="CPU to pin the generator to (default: the last one, when there are several; 'none')",
    )
    parser.add_argument(
        "--ca", metavar="PEM", help="tls, wss, dtls: trust this CA (default: the system's)"
    )
    parser.add_argument(
        "--subject",
        default="bench",
        help="NATS subject (default bench); with --channels, '{i}' is the channel's number",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=1,
        metavar="N",
        help="N channels: subscriber j and publisher i are on channel j %% N and i %% N; each "
        "subscriber expects what its channel's publishers sent, and a flooding publisher stays "
        "at most --window ahead of the slowest subscriber of its channel (default 1). Channels "
        "are chosen by --subscribe and --publish-to (gateway JSON listeners) or by a --subject "
        "with '{i}' (NATS)",
    )
    parser.add_argument(
        "--subscribe",
        metavar="CHANNEL",
        help="subscribers are JSON-lines clients (tcp://, tls:// of a listener with "
        'format = "json") that send {"type":"subscribe","channel":CHANNEL} and '
        "wait for the answer; '{i}' in CHANNEL is the channel's number, e.g. 'ch.{i}'",
    )
    parser.add_argument(
        "--publish-to",
        metavar="CHANNEL",
        help="publishers are JSON-lines clients that send each message as "
        '{"type":"message","channel":CHANNEL,"text":...}; \'{i}\' as for --subscribe',
    )
    parser.add_argument(
        "--unsubscribe",
        metavar="NAME",
        help="JSON clients (--subscribe, --publish-to, --wildcard) first leave NAME, e.g. the "
        "listener's channel 'main', so that thousands of peers on it (its presence events, "
        "welcome lists) are not part of the run",
    )
    parser.add_argument(
        "--wildcard",
        action="append",
        default=[],
        metavar="URL",
        help="one more subscriber: a JSON-lines client at URL (tcp://, tls://) subscribed to "
        "'>' (every channel), expecting every message of every publisher; repeat for more",
    )
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
    parser.add_argument(
        "--churn",
        action="append",
        default=[],
        metavar="RATE@URL",
        help="RATE clients a second connect to URL (tcp://, ws://, nats://, nats+ws://), wait "
        "for the welcome and leave, during the run; reports connect-to-welcome and, with --pid, "
        "the server's memory before and --settle seconds after; repeat for more",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


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
        if self.pub.scheme == "dtls":
            raise BenchError("--pub: dtls:// is for subscribers; publish over tcp, tls or udp")
        self.subscribers = args.subscribers
        self.publishers = args.publishers
        self.size = args.size
        self.rate = args.rate
        self.duration = args.duration
        self.warmup = args.warmup
        self.window = args.window
        self.block = args.block
        self.idle = args.idle
        self.settle = args.settle
        self.pid = args.pid
        self.by_transport = args.by_transport
        self.cpu = _cpu(args.cpu)
        self.ca = args.ca
        self.subject = args.subject
        self.channels = args.channels
        self.subscribe = args.subscribe
        self.publish_to = args.publish_to
        self.unsubscribe = args.unsubscribe
        self.wildcards = [Target.parse(url) for url in args.wildcard]
        self.procs = args.procs
        self.sources = args.sources
        self.connect_timeout = args.connect_timeout
        self.drain = args.drain
        self.json = args.json
        self.churn = [parse_churn(spec) for spec in args.churn]
        self.churn_specs: list[str] = list(args.churn)
        if self.churn and args.idle:
            raise BenchError("--churn runs during the load: not with --idle")
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
        if self.block not in BLOCKS or self.block >= self.window:
            raise BenchError(
                f"--block must be one of {', '.join(map(str, BLOCKS))}, below --window"
            )
        if self.procs > 1 and self.rate == 0 and not self.idle:
            raise BenchError("flood mode runs in one process (it watches every subscriber)")
        self._check_channels()
        if self.sources and not all(_loopback4(t.host) for t in self.subs):
            raise BenchError("--sources needs IPv4 loopback targets (127.x.y.z)")
        if self.by_transport and self.pid is None:
            raise BenchError("--by-transport reads the server's memory: give its --pid")
        if self.pid is not None and not Path(f"/proc/{self.pid}").exists():
            raise BenchError(f"--pid {self.pid}: no such process")

    def _check_channels(self) -> None:
        json_schemes = ("tcp", "tls")
        if self.channels < 1:
            raise BenchError("--channels must be at least 1")
        if self.channels > min(self.subscribers, self.publishers):
            raise BenchError("--channels: every channel needs a subscriber and a publisher")
        if self.subscribe and any(t.scheme not in json_schemes for t in self.subs):
            raise BenchError("--subscribe needs tcp:// or tls:// --sub URLs (JSON listeners)")
        if self.publish_to and self.pub.scheme not in json_schemes:
            raise BenchError("--publish-to needs a tcp:// or tls:// publisher URL")
        if any(t.scheme not in json_schemes for t in self.wildcards):
            raise BenchError("--wildcard needs tcp:// or tls:// URLs (JSON listeners)")
        if self.channels > 1:
            nats = self.pub.scheme in ("nats", "nats+ws") and "{i}" in self.subject
            chosen = bool(self.subscribe and self.publish_to)
            if not (nats or chosen):
                raise BenchError(
                    "--channels N needs --subscribe and --publish-to with '{i}' (gateway) "
                    "or a --subject with '{i}' (NATS)"
                )
            if chosen and "{i}" not in str(self.publish_to):
                raise BenchError("--channels N: put '{i}' in --publish-to")
        if (self.channels > 1 or self.wildcards) and self.procs > 1:
            raise BenchError("--channels and --wildcard run in one process")

    @staticmethod
    def name(template: str, channel: int) -> str:
        """A channel name or subject from its template: '{i}' is the channel's number."""
        return template.replace("{i}", str(channel))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(args)

    @property
    def mode(self) -> str:
        if self.idle:
            return "idle"
        return "rate" if self.rate > 0 else "flood"

    def plan(self) -> list[Placement]:
        """Each subscriber's target, source address and channel (round-robin over --sub URLs).

        The --wildcard subscribers come last, with channel -1 (every channel).
        """
        plan = []
        for i in range(self.subscribers):
            source = f"127.0.0.{2 + i % self.sources}" if self.sources else None
            plan.append((self.subs[i % len(self.subs)], source, i % self.channels))
        plan.extend((target, None, WILDCARD) for target in self.wildcards)
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
            "block": self.block,
            "procs": self.procs,
            "by_transport": self.by_transport,
            "sources": self.sources,
            "cpu": self.cpu,
            "sample": "all" if self.parse_all else "chunk",
            "channels": self.channels,
            "subscribe": self.subscribe,
            "publish_to": self.publish_to,
            "unsubscribe": self.unsubscribe,
            "wildcards": [str(t) for t in self.wildcards],
            "churn": [f"{rate}@{target}" for rate, target in self.churn],
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
