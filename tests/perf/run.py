"""Side-by-side fan-out comparison: the gateway against what users would pick instead.

    .venv/bin/python -m tests.perf.run            # about 5 minutes on 2 cores
    .venv/bin/python -m tests.perf.run --quick    # one short run per server (a smoke check)

Every server runs pinned to CPU 0 and ``gateway bench`` (the load generator)
to CPU 1. Each scenario starts all of its servers, then runs the bench against
each in turn, three rounds in rotating order so that drift on the machine hits
every server alike, and keeps the median of each figure. Writes
``docs/benchmarks.md`` (tables, targets, the machine, how to reproduce, and
the figures as a JSON baseline that the next run compares itself with) and
``docs/images/benchmarks.png``.

Needs 2 CPUs, and ``nats-server`` (Debian package) on the PATH for a full run (with --only,
its runs are left out when it is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SERVER_CPU = 0
BENCH_CPU = 1
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "images" / "benchmarks.png"
COMMAND = ".venv/bin/python -m tests.perf.run"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_to_server_cpu() -> None:
    os.sched_setaffinity(0, {SERVER_CPU})


# Servers


@dataclass
class Server:
    """One server process under test, pinned to the server CPU."""

    name: str
    argv: list[str]
    ready: str  # a regular expression its log shows once it listens
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self, workdir: Path) -> None:
        self.log = workdir / f"{self.name}.log"
        out = self.log.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=self.cwd or workdir,
            preexec_fn=pin_to_server_cpu,
        )
        out.close()
        deadline = time.monotonic() + 20
        pattern = re.compile(self.ready)
        while time.monotonic() < deadline:
            if pattern.search(self.log.read_text(errors="replace")):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text(errors='replace')}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Ports:
    """The ports of one comparison run, chosen once."""

    def __init__(self) -> None:
        self.gw_tcp = free_port()
        self.gw_json = free_port()
        self.gw_tls = free_port()
        self.gw_udp = free_port(socket.SOCK_DGRAM)
        self.gw_ws = free_port()
        self.gw_wss = free_port()
        self.nats = free_port()
        self.nats_ws = free_port()
        self.tutorial = free_port()
        self.raw = free_port()
        self.raw_udp = free_port(socket.SOCK_DGRAM)
        self.autobahn_tcp = free_port()
        self.autobahn_ws = free_port()


def gateway_config(ports: Ports) -> str:
    return f"""# gateway bench configuration: defaults, but room for 20,000 peers.
[gateway]
name = "bench"

[limits]
max_connections = 30000

[[listeners]]
name = "tcp"
type = "tcp"
port = {ports.gw_tcp}

[[listeners]]
name = "json"
type = "tcp"
port = {ports.gw_json}
format = "json"

[[listeners]]
name = "tls"
type = "tls"
port = {ports.gw_tls}
cert = "certs/server.pem"
key = "certs/server.key"
generate_dev_cert = true

[[listeners]]
name = "udp"
type = "udp"
port = {ports.gw_udp}
max_peers = 20000

[[listeners]]
name = "ws"
type = "ws"
port = {ports.gw_ws}

[[listeners]]
name = "wss"
type = "wss"
port = {ports.gw_wss}
cert = "certs/server.pem"
key = "certs/server.key"
generate_dev_cert = true
"""


def servers(ports: Ports, workdir: Path) -> dict[str, Server]:
    (workdir / "gateway.toml").write_text(gateway_config(ports))
    (workdir / "nats.conf").write_text(
        f'listen: "127.0.0.1:{ports.nats}"\n'
        f'websocket {{\n  listen: "127.0.0.1:{ports.nats_ws}"\n  no_tls: true\n}}\n'
    )
    return {
        "gateway": Server(
            "gateway",
            [PYTHON, "-m", "gateway", "--config", str(workdir / "gateway.toml")],
            r"gateway 'bench' .* running",
        ),
        "nats": Server(
            "nats",
            ["nats-server", "-c", str(workdir / "nats.conf")],
            r"Server is ready",
            env={"GOMAXPROCS": "1"},
        ),
        "tutorial": Server(
            "tutorial",
            [PYTHON, "-m", "tests.perf.tutorial_server", str(ports.tutorial)],
            r"listening",
            cwd=ROOT,
        ),
        "raw": Server(
            "raw",
            [PYTHON, "-m", "tests.perf.raw_server", str(ports.raw), str(ports.raw_udp)],
            r"listening",
            cwd=ROOT,
        ),
        "autobahn": Server(
            "autobahn",
            [
                PYTHON,
                "-m",
                "tests.perf.autobahn_server",
                str(ports.autobahn_tcp),
                str(ports.autobahn_ws),
            ],
            r"listening",
            cwd=ROOT,
        ),
    }


# Scenarios


@dataclass
class Scenario:
    key: str
    title: str
    # run name (a server's, or REFERENCE) -> bench arguments (without --pid, --cpu, --json)
    runs: dict[str, list[str]]
    rounds: int = 3
    fresh: bool = False  # restart the server before each run (memory baselines)
    timeout: float = 120.0

    def server(self, run: str) -> str:
        """The server a run is against: a reference run is the gateway's."""
        return "gateway" if run == REFERENCE else run

    @property
    def servers(self) -> list[str]:
        return list(dict.fromkeys(self.server(run) for run in self.runs))


REFERENCE = "gateway tcp100"
"""A run of tcp100 against the gateway inside another scenario, in alternating rounds with
it, so that the scenario's ratio to tcp100 is of one time and one machine load."""


def scenarios(ports: Ports, workdir: Path, quick: bool) -> list[Scenario]:
    ca = str(workdir / "certs" / "ca.pem")
    seconds = (
        ["--warmup", "0.5", "--duration", "1"] if quick else ["--warmup", "1", "--duration", "2"]
    )
    flood = ["--size", "100", *seconds]
    gw_tcp = f"tcp://127.0.0.1:{ports.gw_tcp}"
    nats = f"nats://127.0.0.1:{ports.nats}"
    tutorial = f"tcp://127.0.0.1:{ports.tutorial}"
    raw = f"tcp://127.0.0.1:{ports.raw}"
    many = "300" if quick else "1000"
    idle = "1000" if quick else "10000"
    rounds = 1 if quick else 3
    spread = {
        "tcp": 6000,
        "tls": 2000,
        "ws": 6000,
        "wss": 1000,
        "udp": 5000,
    }
    if quick:
        spread = {k: v // 10 for k, v in spread.items()}
    urls = {
        "tcp": gw_tcp,
        "tls": f"tls://127.0.0.1:{ports.gw_tls}",
        "ws": f"ws://127.0.0.1:{ports.gw_ws}/ws",
        "wss": f"wss://127.0.0.1:{ports.gw_wss}/ws",
        "udp": f"udp://127.0.0.1:{ports.gw_udp}",
    }
    # Round-robin spread with the listed weights: repeat each URL by its share of 1000.
    total = sum(spread.values())
    weighted = [url for name, url in urls.items() for _ in range(spread[name] * 20 // total)]
    tcp100 = ["--sub", gw_tcp, "-n", "100", *flood]
    gw_json = f"tcp://127.0.0.1:{ports.gw_json}"
    channels = "100" if quick else "1000"
    per_channel = 10
    on_channels = [
        "-n",
        str(int(channels) * per_channel),
        "-m",
        channels,
        "--channels",
        channels,
        *flood,
        # Each channel has its own --window of queue: drain them all, connect 11,000 peers.
        "--drain",
        "30",
        "--connect-timeout",
        "120",
    ]
    return [
        Scenario(
            "tcp100",
            "TCP fan-out: 1 publisher, 100 TCP subscribers, flood",
            {
                "gateway": ["--sub", gw_tcp, "-n", "100", *flood],
                "nats": ["--sub", nats, "-n", "100", *flood],
                "tutorial": ["--sub", tutorial, "-n", "100", *flood],
                "raw": ["--sub", raw, "-n", "100", *flood],
            },
            rounds,
        ),
        Scenario(
            "ch1000",
            f"Channels: {int(channels):,} channels x {per_channel} JSON-lines TCP subscribers "
            "(subscribed with a JSON request), one JSON-lines publisher per channel, flood",
            {
                "gateway": [
                    "--sub",
                    gw_json,
                    *on_channels,
                    "--subscribe",
                    "ch.{i}",
                    "--publish-to",
                    "ch.{i}",
                    "--unsubscribe",
                    "main",
                ],
                REFERENCE: tcp100,
                "nats": ["--sub", nats, *on_channels, "--subject", "ch.{i}"],
            },
            rounds,
            timeout=300,
        ),
        Scenario(
            "wild",
            "Wildcard: tcp100 plus one JSON-lines TCP subscriber to `>` (every channel), flood",
            {
                "gateway": [*tcp100, "--wildcard", gw_json],
                REFERENCE: tcp100,
            },
            rounds,
        ),
        Scenario(
            "tcp1000",
            f"TCP fan-out: 1 publisher, {many} TCP subscribers, flood",
            {
                "gateway": ["--sub", gw_tcp, "-n", many, *flood],
                "nats": ["--sub", nats, "-n", many, *flood],
                "raw": ["--sub", raw, "-n", many, *flood],
            },
            rounds,
        ),
        Scenario(
            "ws100",
            "WebSocket fan-out: 1 TCP publisher, 100 WebSocket subscribers, flood",
            {
                "gateway": [
                    "--sub",
                    f"ws://127.0.0.1:{ports.gw_ws}/ws",
                    "--pub",
                    gw_tcp,
                    "-n",
                    "100",
                    *flood,
                ],
                "autobahn": [
                    "--sub",
                    f"ws://127.0.0.1:{ports.autobahn_ws}/",
                    "--pub",
                    f"tcp://127.0.0.1:{ports.autobahn_tcp}",
                    "-n",
                    "100",
                    *flood,
                ],
                "nats": [
                    "--sub",
                    f"nats+ws://127.0.0.1:{ports.nats_ws}/",
                    "--pub",
                    nats,
                    "-n",
                    "100",
                    *flood,
                ],
            },
            rounds,
        ),
        Scenario(
            "mixed",
            "Mixed: 25 tcp + 25 tls + 25 ws + 25 udp subscribers, 1 TCP publisher, flood",
            {
                "gateway": [
                    "--sub",
                    gw_tcp,
                    "--sub",
                    urls["tls"],
                    "--sub",
                    urls["ws"],
                    "--sub",
                    urls["udp"],
                    "--ca",
                    ca,
                    "-n",
                    "100",
                    *flood,
                ],
                # The one-sendto-per-datagram limit: 25 UDP peers of the raw server.
                "raw": [
                    "--sub",
                    f"udp://127.0.0.1:{ports.raw_udp}",
                    "--pub",
                    raw,
                    "-n",
                    "25",
                    *flood,
                ],
            },
            rounds,
            fresh=True,  # UDP peers of an earlier round would still be sent to
        ),
        Scenario(
            "latency",
            "Latency and cost: 1,000 msgs/s to 100 TCP subscribers (100k deliveries/s)",
            {
                "gateway": ["--sub", gw_tcp, "-n", "100", "--rate", "1000", *seconds],
                "nats": ["--sub", nats, "-n", "100", "--rate", "1000", *seconds],
                "tutorial": ["--sub", tutorial, "-n", "100", "--rate", "1000", *seconds],
            },
            rounds,
        ),
        Scenario(
            "idle_tcp",
            f"Memory: {idle} idle TCP peers",
            {"gateway": ["--sub", gw_tcp, "-n", idle, "--idle", "--settle", "2"]},
            1,  # deterministic: three rounds agreed within 1%
            fresh=True,
        ),
        Scenario(
            "idle_ws",
            f"Memory: {idle} idle WebSocket peers",
            {
                "gateway": [
                    "--sub",
                    urls["ws"],
                    "--pub",
                    gw_tcp,
                    "-n",
                    idle,
                    "--idle",
                    "--settle",
                    "2",
                ]
            },
            1,  # deterministic: three rounds agreed within 1%
            fresh=True,
        ),
        Scenario(
            "peers20k",
            f"{total:,} peers at once (tcp {spread['tcp']}, tls {spread['tls']}, ws {spread['ws']}, "
            f"wss {spread['wss']}, udp {spread['udp']}), 2 msgs/s broadcast to all",
            {
                "gateway": [
                    *[arg for url in weighted for arg in ("--sub", url)],
                    "--pub",
                    gw_tcp,
                    "--ca",
                    ca,
                    "-n",
                    str(total),
                    "--rate",
                    "2",
                    "--warmup",
                    "1",
                    "--duration",
                    "3",
                    "--procs",
                    "4",
                    "--sources",
                    "8",
                    "--connect-timeout",
                    "120",
                ]
            },
            1,
            fresh=True,
            timeout=300,
        ),
    ]


def bench(args: list[str], server: Server, timeout: float) -> dict[str, Any]:
    argv = [
        PYTHON,
        "-m",
        "gateway",
        "bench",
        *args,
        "--pid",
        str(server.pid),
        "--cpu",
        str(BENCH_CPU),
        "--json",
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )
    if not done.stdout.strip():
        raise RuntimeError(f"bench failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# Running


def load_average() -> float:
    return os.getloadavg()[0]


def run_scenario(
    scenario: Scenario, all_servers: dict[str, Server], workdir: Path, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    names = list(scenario.runs)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    if not scenario.fresh:
        for name in scenario.servers:
            all_servers[name].start(workdir)
    try:
        for round_number in range(scenario.rounds):
            # Rotate the order each round: drift hits every server alike.
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                server = all_servers[scenario.server(name)]
                if scenario.fresh:
                    server.start(workdir)
                    time.sleep(0.5)
                try:
                    result = bench(scenario.runs[name], server, scenario.timeout)
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                    result = {"error": str(e)}
                finally:
                    if scenario.fresh:
                        server.stop()
                result["load_average"] = load_average()
                results[name].append(result)
                log(f"  {scenario.key} {name} round {round_number + 1}: {summary(result)}")
    finally:
        if not scenario.fresh:
            for name in scenario.servers:
                all_servers[name].stop()
    return results


def summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR " + str(result["error"])[:300]
    server = result.get("server", {})
    if result["options"]["mode"] == "idle":
        per = server.get("rss_per_peer_bytes")
        return f"{per / 1024:.2f} KiB/peer" if per is not None else "?"
    latency = result["latency_ms"]
    return (
        f"{result['delivered_per_second'] / 1e6:.2f}M/s lost {result['lost']} "
        f"p99 {latency['p99']} ms CPU {server.get('cpu_percent', 0):.0f}% "
        f"client {result['client']['cpu_percent']:.0f}%"
    )


def median_of(runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], Any]) -> float | None:
    values = []
    for run in runs:
        if "error" in run:
            continue
        with contextlib.suppress(KeyError, TypeError):
            value = pick(run)
            if value is not None:
                values.append(float(value))
    return statistics.median(values) if values else None


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over a server's runs in one scenario."""
    out: dict[str, Any] = {
        "runs": len(runs),
        "errors": [r["error"] for r in runs if "error" in r],
        "delivered_per_second": median_of(runs, lambda r: r["delivered_per_second"]),
        "lost": median_of(runs, lambda r: r["lost"]),
        "lost_max": max((r["lost"] for r in runs if "lost" in r), default=None),
        "p50_ms": median_of(runs, lambda r: r["latency_ms"]["p50"]),
        "p99_ms": median_of(runs, lambda r: r["latency_ms"]["p99"]),
        "p999_ms": median_of(runs, lambda r: r["latency_ms"]["p999"]),
        "server_cpu_percent": median_of(runs, lambda r: r["server"]["cpu_percent"]),
        "ns_per_delivery": median_of(runs, lambda r: r["server"]["cpu_ns_per_delivery"]),
        "client_cpu_percent": median_of(runs, lambda r: r["client"]["cpu_percent"]),
        "rss_per_peer_bytes": median_of(runs, lambda r: r["server"]["rss_per_peer_bytes"]),
        "rss_bytes": median_of(runs, lambda r: r["server"]["rss_bytes"]),
        "connected": median_of(
            runs, lambda r: sum(t["connected"] for t in r["transports"].values())
        ),
        "load_average": median_of(runs, lambda r: r["load_average"]),
    }
    transports: dict[str, Any] = {}
    names = {name for r in runs if "transports" in r for name in r["transports"]}
    for name in sorted(names):
        transports[name] = {
            key: median_of(runs, _transport_figure(name, path))
            for key, path in (
                ("delivered_per_second", "delivered_per_second"),
                ("lost", "lost"),
                ("connected", "connected"),
                ("p99_ms", "latency_ms.p99"),
            )
        }
    out["transports"] = transports
    return out


def _transport_figure(name: str, path: str) -> Callable[[dict[str, Any]], Any]:
    def pick(run: dict[str, Any]) -> Any:
        value = run["transports"][name]
        for part in path.split("."):
            value = value[part]
        return value

    return pick


# Targets


@dataclass
class Check:
    scenario: str
    target: str
    measured: str
    ratio: str
    met: bool | None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def checks(table: dict[str, dict[str, Any]]) -> list[Check]:
    out: list[Check] = []

    def get(scenario: str, server: str, key: str) -> Any:
        return table.get(scenario, {}).get(server, {}).get(key)

    def throughput(scenario: str, versus: str, factor: float, label: str) -> None:
        gw = get(scenario, "gateway", "delivered_per_second")
        other = get(scenario, versus, "delivered_per_second")
        r = ratio(gw, other)
        out.append(
            Check(
                scenario,
                f"≥ {factor:g}x {label}",
                f"{_m(gw)} vs {_m(other)} deliveries/s",
                f"{r:.2f}x" if r is not None else "-",
                None if r is None else r >= factor,
            )
        )

    throughput("tcp100", "nats", 2.5, "nats-server")
    throughput("tcp100", "tutorial", 15, "tutorial Twisted server")
    throughput("tcp1000", "nats", 2, "nats-server")
    throughput("ws100", "autobahn", 15, "Autobahn sendMessage loop")
    throughput("ws100", "nats", 0.7, "nats-server (its WebSocket)")
    udp = table.get("mixed", {}).get("gateway", {}).get("transports", {}).get("udp", {})
    udp_rate = udp.get("delivered_per_second")
    ceiling = get("mixed", "raw", "delivered_per_second")
    r = ratio(udp_rate, ceiling)
    out.append(
        Check(
            "mixed",
            "UDP near the one-sendto-per-datagram limit (raw sendto loop, 25 peers)",
            f"{_m(udp_rate)} vs {_m(ceiling)} datagrams/s",
            f"{r:.2f}x" if r is not None else "-",
            None if r is None else r >= 0.5,
        )
    )
    gw_p99, nats_p99 = get("latency", "gateway", "p99_ms"), get("latency", "nats", "p99_ms")
    lost = get("latency", "gateway", "lost_max")
    out.append(
        Check(
            "latency",
            "p99 ≤ nats-server's p99, no loss",
            f"{_ms(gw_p99)} vs {_ms(nats_p99)} ms, lost {lost}",
            f"{ratio(gw_p99, nats_p99):.2f}x" if ratio(gw_p99, nats_p99) is not None else "-",
            None if gw_p99 is None or nats_p99 is None else gw_p99 <= nats_p99 and lost == 0,
        )
    )
    gw_cost, nats_cost = (
        get("latency", "gateway", "ns_per_delivery"),
        get("latency", "nats", "ns_per_delivery"),
    )
    r = ratio(gw_cost, nats_cost)
    out.append(
        Check(
            "latency",
            "server CPU per delivery ≤ nats-server's",
            f"{_n(gw_cost)} vs {_n(nats_cost)} ns",
            f"{r:.2f}x" if r is not None else "-",
            None if r is None else r <= 1.0,
        )
    )
    for key, limit, label in (("idle_tcp", 2048, "2 KB"), ("idle_ws", 12288, "12 KB")):
        per = get(key, "gateway", "rss_per_peer_bytes")
        out.append(
            Check(
                key,
                f"≤ {label} per idle peer above baseline",
                f"{per / 1024:.2f} KiB" if per is not None else "-",
                "-",
                None if per is None else per <= limit,
            )
        )
    connected = get("peers20k", "gateway", "connected")
    lost = get("peers20k", "gateway", "lost_max")
    wanted = sum(
        t.get("connected") or 0
        for t in table.get("peers20k", {}).get("gateway", {}).get("transports", {}).values()
    )
    out.append(
        Check(
            "peers20k",
            "20,000 peers at once, broadcast reaches all",
            f"{_n(connected)} connected, lost {lost}",
            "-",
            None if connected is None else connected >= 20000 and lost == 0 and wanted >= 20000,
        )
    )
    throughput("ch1000", REFERENCE, 0.7, "tcp100 deliveries/s (same run)")
    wild = get("wild", "gateway", "delivered_per_second")
    single = get("wild", REFERENCE, "delivered_per_second")
    r = ratio(wild, single)
    out.append(
        Check(
            "wild",
            "≈ tcp100 (ratio reported; same run, 101 vs 100 subscribers)",
            f"{_m(wild)} vs {_m(single)} deliveries/s",
            f"{r:.2f}x" if r is not None else "-",
            None if r is None else r >= 0.9,
        )
    )
    return out


def _m(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.0f}k"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# Report


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        except OSError:
            return "?"
        return str(done.stdout).strip()

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version as installed

    debian = Path("/etc/debian_version")
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
        "python": platform.python_version(),
        "twisted": installed("twisted"),
        "autobahn": installed("autobahn"),
        "nats_server": version(["nats-server", "--version"]),
    }


def previous_baseline() -> dict[str, Any] | None:
    if not DOC.exists():
        return None
    match = re.search(r"```json\n(\{.*?\})\n```", DOC.read_text(), re.S)
    if not match:
        return None
    try:
        value: dict[str, Any] = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    return value


def write_report(
    table: dict[str, dict[str, Any]],
    titles: dict[str, str],
    info: dict[str, Any],
    started: datetime,
    elapsed: float,
    loads: tuple[float, float],
    quick: bool,
) -> None:
    found = checks(table)
    previous = previous_baseline()
    lines = [
        "# Benchmarks",
        "",
        "Fan-out speed of the gateway against what users would pick instead, measured side by",
        "side in one run by `gateway bench` (the load generator shipped with the gateway).",
        f"This page is written by `{COMMAND}`; do not edit it by hand.",
        "",
        f"Run: {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} minutes"
        + (" (**--quick**: one short round, smaller scenarios; not a measurement)" if quick else "")
        + ".",
        "",
        "## Targets",
        "",
        "| scenario | target | measured (median) | ratio | met |",
        "|---|---|---|---|---|",
    ]
    lines += [target_line(check) for check in found]
    lines += [
        "",
        targets_met(lines),
        "",
        "![deliveries per second by scenario and server](images/benchmarks.png)",
        "",
        "## All figures",
        "",
        "Medians over the rounds of each scenario. *deliveries/s* counts messages received by",
        "subscribers in the measured window; *CPU* is the server's, from `/proc` (all threads);",
        "*ns/delivery* is server CPU time divided by deliveries; *client* is the load generator's",
        "own CPU (near 100% would mean the generator limits the figure).",
        "",
        "| scenario | server | deliveries/s | lost | p50 / p99 / p99.9 ms | server CPU | ns/delivery | client CPU | memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += figure_lines(table)
    lines += ["", "Scenarios:", ""]
    for key, title in titles.items():
        lines.append(scenario_line(key, title))
    if previous is not None:
        lines += ["", "## Against the previous recorded baseline", ""]
        lines += [
            "| scenario | server | deliveries/s then → now | p99 ms then → now |",
            "|---|---|---|---|",
        ]
        for key, servers_of in table.items():
            for name, f in servers_of.items():
                old = previous.get("figures", {}).get(key, {}).get(name)
                if not old:
                    continue
                lines.append(
                    f"| {key} | {name} | {_m(old.get('delivered_per_second'))} → "
                    f"{_m(f.get('delivered_per_second'))} | {_ms(old.get('p99_ms'))} → {_ms(f.get('p99_ms'))} |"
                )
    notes = Path(__file__).with_name("notes.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    lines += [
        "",
        "## The machine",
        "",
        f"- {info['cpus']} x {info['cpu']}, {info['memory_gib']} GiB, {info['os']}, "
        f"Linux {info['kernel']}",
        f"- Python {info['python']}, Twisted {info['twisted']}, Autobahn {info['autobahn']}, "
        f"{info['nats_server']}",
        f"- Load average (1 min) {loads[0]:.2f} before the run, {loads[1]:.2f} after. Other",
        "  sessions' test suites (pytest, headless Chromium) ran on this machine at the same time;",
        "  a load average above ~0.3 before the run means they shared the cores, which lowers and",
        "  scatters every figure. Ratios from the same run are the meaningful part.",
        "",
        *measured_lines(),
        "## Recorded baseline",
        "",
        "The figures of this run, which the next run compares itself with:",
        "",
        "```json",
        json.dumps(
            {
                "date": f"{started:%Y-%m-%d}",
                "quick": quick,
                "figures": baseline_figures(table),
            },
            indent=1,
            sort_keys=True,
        ),
        "```",
        "",
    ]
    DOC.write_text("\n".join(lines))


def measured_lines() -> list[str]:
    """The "How it is measured" section."""
    return [
        "## How it is measured",
        "",
        f"- One command: `{COMMAND}` (add `--quick` for a one-minute check). It needs 2 CPUs",
        "  and `nats-server` (`apt-get install nats-server`), and takes about 5 minutes.",
        f"- Every server is pinned to CPU {SERVER_CPU}, the load generator to CPU {BENCH_CPU}.",
        "  nats-server runs with `GOMAXPROCS=1`. The gateway runs `gateway --config` with the",
        "  defaults, except `limits.max_connections = 30000` and `max_peers = 20000` on UDP.",
        "- Each scenario starts its servers, then runs `gateway bench` against each in turn, in",
        "  rotating order, 3 rounds; medians are reported. Memory and the 20,000-peer run",
        "  are one round each on a fresh server (three rounds of the memory runs agreed within",
        "  1%); memory is the server's RSS after the peers settled, minus its RSS before the",
        "  first connection, divided by the peers.",
        "- Messages are 100-byte payloads carrying publisher, sequence number and send time.",
        "  Flood is closed-loop: the publisher stays at most 2,000 messages ahead of the slowest",
        "  stream subscriber, so no server hits a slow-consumer limit. Latency in flood runs is",
        "  sampled (the last message of each read) and mostly measures that queue; at a fixed",
        "  rate every message is timed and sequence-checked.",
        "- Comparison servers, all in `tests/perf/`: `tutorial_server.py` (Twisted",
        "  `LineReceiver`, a client list, one `sendLine` per receiver), `autobahn_server.py`",
        "  (Autobahn's broadcast example: one `sendMessage` per client; fed by a TCP line",
        "  publisher), `raw_server.py` (no framework: each read's whole lines `sendall`-ed to each",
        "  client, one `sendto` per datagram per UDP peer — a ceiling, not a usable server), and",
        "  nats-server driven over its own protocol (`nats://`, and `nats+ws://` for its",
        "  WebSocket) by the same generator.",
        "- The 20,000-peer run uses 4 client processes and 8 source addresses (127.0.0.2 to 127.0.0.9);",
        "  the runner raises its open-file limit to the hard limit.",
        '- Channels (ch1000): the gateway gets one more `tcp` listener with `format = "json"`.',
        "  `gateway bench --channels 1000 --subscribe 'ch.{i}' --publish-to 'ch.{i}'` puts",
        "  subscriber j and publisher i on channels `ch.<j % 1000>` and `ch.<i % 1000>`: each",
        '  subscriber sends `{"type":"subscribe","channel":"ch.<n>"}` and waits for the',
        "  answer, each publisher sends every message as",
        '  `{"type":"message","channel":"ch.<n>","text":...}`. `--unsubscribe main`',
        "  has every JSON client leave the listener's channel first, so that 11,000 peers on",
        "  `main` (their join/leave events, welcome lists) are not part of the run. Each channel",
        "  is probed until all its subscribers are attached; a subscriber expects exactly what",
        "  its channel's publisher sent (more is counted as duplicated, another channel's",
        "  message as foreign when every message is parsed); each publisher stays at most 2,000",
        "  messages ahead of the slowest subscriber of its channel. nats-server gets the same",
        "  shape on subjects `ch.<n>` (`--subject 'ch.{i}'`).",
        "- Wildcard (wild): tcp100 plus `--wildcard URL`, one JSON-lines subscriber to `>` on",
        "  the JSON listener, which expects every message; the publisher also stays at most",
        "  2,000 messages ahead of it.",
        f"- `{REFERENCE}`: a tcp100 run inside the ch1000 and wild scenarios, in alternating",
        "  rounds with their other runs, so that their ratio to tcp100 is of the same minutes.",
        "- A partial run (`--only ch1000,wild`) replaces only those scenarios' rows, scenario",
        "  lines and recorded figures in this page, and notes when they were run.",
        "",
    ]


def figure_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """The rows of the "All figures" table."""
    lines = []
    for key, servers_of in table.items():
        for name, f in servers_of.items():
            memory = ""
            if f.get("rss_per_peer_bytes") is not None:
                memory = f"{f['rss_per_peer_bytes'] / 1024:.2f} KiB/peer"
            elif f.get("rss_bytes") is not None:
                memory = f"{f['rss_bytes'] / 2**20:.0f} MiB"
            latency = (
                f"{_ms(f['p50_ms'])} / {_ms(f['p99_ms'])} / {_ms(f['p999_ms'])}"
                if f.get("p50_ms") is not None
                else "-"
            )
            cpu = f"{f['server_cpu_percent']:.0f}%" if f.get("server_cpu_percent") else "-"
            client = f"{f['client_cpu_percent']:.0f}%" if f.get("client_cpu_percent") else "-"
            errors = f" (errors: {len(f['errors'])})" if f.get("errors") else ""
            lines.append(
                f"| {key} | {name}{errors} | {_m(f['delivered_per_second'])} | "
                f"{_n(f['lost'])} | {latency} | {cpu} | {_n(f['ns_per_delivery'])} | {client} | {memory} |"
            )
            if len(f.get("transports", {})) > 1:
                for transport, t in f["transports"].items():
                    lines.append(
                        f"| | ↳ {transport} ({_n(t['connected'])} peers) | {_m(t['delivered_per_second'])} | "
                        f"{_n(t['lost'])} | p99 {_ms(t['p99_ms'])} | | | | |"
                    )
    return lines


def targets_met(lines: list[str]) -> str:
    """The sentence under the Targets table, from its rows among ``lines``."""
    rows = [line for line in lines if _first_cell(line) and line.startswith("| ")]
    rows = [r for r in rows if r.count("|") == 6 and r.split("|")[1].strip() != "scenario"]
    met = [r for r in rows if r.rstrip().endswith("**yes** |")]
    missed = [r.split("|") for r in rows if r.rstrip().endswith("**no** |")]
    text = f"{len(met)} of {len(rows)} targets met"
    if missed:
        text += ": missed " + "; ".join(f"{c[1].strip()} ({c[2].strip()})" for c in missed)
    return text + "."


def _first_cell(line: str) -> str | None:
    """The first cell of a table row (None: not a row, or the header's rule)."""
    if not line.startswith("|") or line.startswith("|---"):
        return None
    return line.split("|")[1].strip()


def merge_report(
    table: dict[str, dict[str, Any]],
    titles: dict[str, str],
    started: datetime,
    elapsed: float,
    loads: tuple[float, float],
    quick: bool,
) -> None:
    """Put the scenarios of a partial run (``--only``) into the existing page: their rows of
    the Targets and All figures tables, their line in the scenario list and their recorded
    figures are replaced (or added at the end); everything else stays as it was."""
    lines = DOC.read_text().split("\n")

    def section(title: str) -> tuple[int, int]:
        start = lines.index(title)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        return start, end

    def merge_rows(title: str, rows: list[str]) -> None:
        """Replace the table rows of the run's scenarios (with their "↳" rows) in a section."""
        start, end = section(title)
        table_rows = [i for i in range(start, end) if lines[i].startswith("|")]
        first, last = table_rows[0], table_rows[-1]
        kept: list[str] = []
        owner = None
        place: int | None = None
        for line in lines[first : last + 1]:
            cell = _first_cell(line)
            if cell:  # a row of a scenario; rows with an empty first cell belong to the one above
                owner = cell
            if cell is not None and owner in table and line.split("|")[1].strip() != "scenario":
                if place is None:
                    place = len(kept)
                continue
            kept.append(line)
        if place is None:
            place = len(kept)
        kept[place:place] = rows
        lines[first : last + 1] = kept

    merge_rows("## Targets", [target_line(c) for c in checks(table) if c.scenario in table])
    start, end = section("## Targets")
    for i in range(start, end):
        if re.match(r"\d+ of \d+ targets met", lines[i]):
            lines[i] = targets_met(lines[start:end])
    merge_rows("## All figures", figure_lines(table))
    start, end = section("## All figures")
    bullets = [i for i in range(start, end) if lines[i].startswith("- **")]
    kept_bullets = [lines[i] for i in bullets if lines[i][4:].split("**")[0] not in table]
    new = kept_bullets + [scenario_line(key, title) for key, title in titles.items()]
    lines[bullets[0] : bullets[-1] + 1] = new
    run = next(i for i, line in enumerate(lines) if line.startswith("Run: "))
    paragraph_end = lines.index("", run)
    keys = ", ".join(table)
    note = (
        f"Scenarios {keys} rerun alone on {started:%Y-%m-%d %H:%M} UTC ({elapsed / 60:.1f} "
        f"minutes, load average {loads[0]:.2f} before, {loads[1]:.2f} after"
        + ("; **--quick**, not a measurement" if quick else "")
        + "): their rows below are of that run."
    )
    targets = lines.index("## Targets")
    stale = [i for i in range(run, targets) if lines[i].startswith(f"Scenarios {keys} ")]
    if stale:
        lines[stale[0]] = note
    else:
        lines[paragraph_end:paragraph_end] = ["", note]
    start, end = section("## How it is measured")
    lines[start:end] = measured_lines()
    notes = Path(__file__).with_name("notes.md")
    if notes.exists() and "## Analysis" in lines:
        start, end = section("## Analysis")
        lines[start:end] = [*notes.read_text().strip().split("\n"), ""]
    text = "\n".join(lines)
    baseline = previous_baseline()
    if baseline is not None:
        baseline.setdefault("figures", {}).update(baseline_figures(table))
        text = re.sub(
            r"```json\n\{.*?\}\n```",
            lambda _: "```json\n" + json.dumps(baseline, indent=1, sort_keys=True) + "\n```",
            text,
            count=1,
            flags=re.S,
        )
    DOC.write_text(text)


def scenario_line(key: str, title: str) -> str:
    return f"- **{key}**: {title}."


def target_line(check: Check) -> str:
    met = "—" if check.met is None else ("**yes**" if check.met else "**no**")
    return f"| {check.scenario} | {check.target} | {check.measured} | {check.ratio} | {met} |"


def baseline_figures(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures the next run compares itself with, by scenario and server."""
    return {
        key: {
            name: {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in f.items()
                if k
                in (
                    "delivered_per_second",
                    "p50_ms",
                    "p99_ms",
                    "ns_per_delivery",
                    "rss_per_peer_bytes",
                    "lost",
                )
            }
            for name, f in servers_of.items()
        }
        for key, servers_of in table.items()
    }


def write_plot(table: dict[str, dict[str, Any]], titles: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [k for k in ("tcp100", "tcp1000", "ws100", "mixed") if k in table]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    colors = {
        "gateway": "#2b7bba",
        "nats": "#e8a33d",
        "tutorial": "#999999",
        "raw": "#555555",
        "autobahn": "#b05ca8",
    }
    ax = axes[0]
    names = ["gateway", "nats", "tutorial", "autobahn", "raw"]
    width = 0.16
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, key in enumerate(throughput):
            value = table[key].get(name, {}).get("delivered_per_second")
            if value:
                xs.append(j + (i - 2) * width)
                ys.append(value / 1e6)
        if xs:
            label = {"raw": "raw-socket ceiling", "tutorial": "tutorial Twisted"}.get(name, name)
            bars = ax.bar(xs, ys, width, label=label, color=colors[name])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(throughput)))
    ax.set_xticklabels(throughput)
    ax.set_ylabel("million deliveries / s (median)")
    ax.set_title("Fan-out, 100-byte messages, flood (server on 1 core)")
    ax.legend(fontsize=8)
    ax = axes[1]
    latency = table.get("latency", {})
    servers_present = [n for n in ("gateway", "nats", "tutorial") if n in latency]
    p50 = [latency[n].get("p50_ms") or 0 for n in servers_present]
    p99 = [latency[n].get("p99_ms") or 0 for n in servers_present]
    positions = list(range(len(servers_present)))
    ax.bar([x - 0.2 for x in positions], p50, 0.4, label="p50", color="#7fb3d5")
    ax.bar([x + 0.2 for x in positions], p99, 0.4, label="p99", color="#1f4e79")
    ax.set_xticks(positions)
    ax.set_xticklabels(servers_present)
    ax.set_ylabel("ms")
    ax.set_title("Latency at 1,000 msgs/s x 100")
    ax.legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


# Main


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gateway-perf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short round, smaller scenarios")
    parser.add_argument(
        "--only",
        help="comma-separated scenario keys; their rows replace those in the existing doc",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 CPUs (server on one, load generator on the other)", file=sys.stderr)
        return 2
    nats = shutil.which("nats-server") is not None
    if not nats and not args.only:
        print("needs nats-server on the PATH: apt-get install nats-server", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = datetime.now(UTC)
    clock = time.monotonic()
    load_before = load_average()

    def log(text: str) -> None:
        print(text, flush=True)

    log(f"load average {load_before:.2f}; open files {hard}")
    table: dict[str, dict[str, Any]] = {}
    titles: dict[str, str] = {}
    with workdir() as work:
        ports = Ports()
        all_servers = servers(ports, work)
        # Make the dev certificates once, before any timing.
        all_servers["gateway"].start(work)
        all_servers["gateway"].stop()
        wanted = set(args.only.split(",")) if args.only else None
        for scenario in scenarios(ports, work, args.quick):
            if wanted is not None and scenario.key not in wanted:
                continue
            if not nats and "nats" in scenario.runs:
                del scenario.runs["nats"]
                log(f"{scenario.key}: no nats-server on the PATH, so no nats runs")
            log(f"{scenario.key}: {scenario.title} (load {load_average():.2f})")
            titles[scenario.key] = scenario.title
            results = run_scenario(scenario, all_servers, work, log)
            table[scenario.key] = {name: figures(runs) for name, runs in results.items()}
    elapsed = time.monotonic() - clock
    found = checks(table)
    for check in found:
        if check.scenario not in table:
            continue
        met = "-" if check.met is None else ("yes" if check.met else "NO")
        log(f"{check.scenario:9} {met:3} {check.target}: {check.measured} ({check.ratio})")
    if args.only and not args.no_write:
        merge_report(table, titles, started, elapsed, (load_before, load_average()), args.quick)
        log(f"merged {', '.join(table)} into {DOC.relative_to(ROOT)}")
    elif not args.no_write:
        write_report(
            table, titles, machine(), started, elapsed, (load_before, load_average()), args.quick
        )
        write_plot(table, titles)
        log(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
