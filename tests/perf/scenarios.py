"""The scenarios of a comparison run: for each, the bench arguments of every server's run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tests.perf.servers import Ports


@dataclass
class Scenario:
    key: str
    title: str
    # run name (a server's, or REFERENCE) -> bench arguments (without --pid, --cpu, --json)
    runs: dict[str, list[str]]
    rounds: int = 3
    fresh: bool = False  # restart the server before each run (memory baselines)
    timeout: float = 120.0
    gateway: str = "gateway"  # the server of the "gateway" run (another configuration)

    def server(self, run: str) -> str:
        """The server a run is against: a reference run is the bench gateway's."""
        if run == REFERENCE:
            return "gateway"
        return self.gateway if run == "gateway" else run

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
    tls_ceiling_pub = f"tcp://127.0.0.1:{ports.tls_ceiling_pub}"
    many = "300" if quick else "1000"
    idle = "1000" if quick else "10000"
    rounds = 1 if quick else 3
    churn_tcp, churn_ws, churn_seconds = (100, 30, "2") if quick else (1000, 300, "30")

    def churning(sub: str, tcp: str, ws: str) -> list[str]:
        """1,000 msgs/s to 100 subscribers at ``sub`` while clients churn at ``tcp``, ``ws``."""
        steady = ["--sub", sub, "-n", "100", "--rate", "1000", "--warmup", "1"]
        churn = ["--churn", f"{churn_tcp}@{tcp}", "--churn", f"{churn_ws}@{ws}"]
        return [*steady, "--duration", churn_seconds, *churn]

    spread = {"tcp": 6000, "tls": 2000, "ws": 6000, "wss": 1000, "udp": 5000}
    spread50k = {"tcp": 15000, "tls": 5000, "ws": 12000, "wss": 3000, "udp": 15000}
    if quick:
        spread = {k: v // 10 for k, v in spread.items()}
        spread50k = {k: v // 10 for k, v in spread50k.items()}
    urls = {
        "tcp": gw_tcp,
        "tls": f"tls://127.0.0.1:{ports.gw_tls}",
        "ws": f"ws://127.0.0.1:{ports.gw_ws}/ws",
        "wss": f"wss://127.0.0.1:{ports.gw_wss}/ws",
        "udp": f"udp://127.0.0.1:{ports.gw_udp}",
    }
    workers = {
        "tcp": f"tcp://127.0.0.1:{ports.wk_tcp}",
        "tls": f"tls://127.0.0.1:{ports.wk_tls}",
        "ws": f"ws://127.0.0.1:{ports.wk_ws}/ws",
        "wss": f"wss://127.0.0.1:{ports.wk_wss}/ws",
        "udp": f"udp://127.0.0.1:{ports.wk_udp}",
    }
    total, total50k = sum(spread.values()), sum(spread50k.values())
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
            "u32",
            "Length-prefixed fan-out: 1 TCP lines publisher, 100 TCP subscribers of a "
            '`framing = "u32"` listener, flood',
            {
                "gateway": [
                    "--sub",
                    f"tcp://127.0.0.1:{ports.gw_u32}?framing=u32",
                    "--pub",
                    gw_tcp,
                    "-n",
                    "100",
                    *flood,
                ],
                REFERENCE: tcp100,
            },
            rounds,
        ),
        Scenario(
            "hist",
            "History: tcp100 on a channel that keeps `history = 1000` (memory store), flood",
            {
                "gateway": ["--sub", f"tcp://127.0.0.1:{ports.gw_hist}", "-n", "100", *flood],
                REFERENCE: tcp100,
            },
            rounds,
            # A subscriber of a later round would first get the last round's 1,000 messages.
            fresh=True,
        ),
        Scenario(
            "hist_sqlite",
            "History: tcp100 on a channel that keeps `history = 1000` in the sqlite store, flood",
            {
                "gateway": ["--sub", f"tcp://127.0.0.1:{ports.gw_sqlite}", "-n", "100", *flood],
                REFERENCE: tcp100,
            },
            rounds,
            fresh=True,  # and an empty file at each start
            gateway="gateway-sqlite",
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
            "tls100",
            "TLS fan-out: 1 TCP publisher, 100 TLS subscribers, flood",
            {
                "gateway": ["--sub", urls["tls"], "--pub", gw_tcp, "--ca", ca, "-n", "100", *flood],
                "tlsceiling": [
                    "--sub",
                    f"tls://127.0.0.1:{ports.tls_ceiling}",
                    "--pub",
                    tls_ceiling_pub,
                    "--ca",
                    ca,
                    "-n",
                    "100",
                    *flood,
                ],
            },
            rounds,
        ),
        Scenario(
            "wss100",
            "WebSocket-over-TLS fan-out: 1 TCP publisher, 100 wss subscribers, flood",
            {
                "gateway": ["--sub", urls["wss"], "--pub", gw_tcp, "--ca", ca, "-n", "100", *flood],
                "tlsceiling": [
                    "--sub",
                    f"wss://127.0.0.1:{ports.wss_ceiling}/ws",
                    "--pub",
                    tls_ceiling_pub,
                    "--ca",
                    ca,
                    "-n",
                    "100",
                    *flood,
                ],
            },
            rounds,
        ),
        Scenario(
            "mixed",
            "Mixed: 25 tcp + 25 tls + 25 ws + 25 udp + 25 dtls subscribers, 1 TCP publisher, flood",
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
                    "--sub",
                    f"dtls://127.0.0.1:{ports.gw_dtls}",
                    "--ca",
                    ca,
                    "-n",
                    "125",
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
                # At this rate each read is one message: one send per receiver per message,
                # the floor for a Python server here.
                "raw": ["--sub", raw, "-n", "100", "--rate", "1000", *seconds],
            },
            rounds,
        ),
        Scenario(
            "churn",
            f"Churn: {churn_tcp} TCP and {churn_ws} WebSocket clients a second connect, get the "
            f"welcome and leave, for {churn_seconds} s, during 1,000 msgs/s to 100 TCP subscribers",
            {
                "gateway": churning(
                    gw_tcp,
                    f"tcp://127.0.0.1:{ports.gw_churn}",
                    f"ws://127.0.0.1:{ports.gw_ws}/ws",
                ),
                "nats": churning(nats, nats, f"nats+ws://127.0.0.1:{ports.nats_ws}/"),
            },
            1,
            fresh=True,  # memory from a fresh start
            timeout=180,
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
            f"{total:,} peers at once ({described(spread)}), 2 msgs/s broadcast to all",
            {"gateway": many_peers(urls, spread, gw_tcp, ca)},
            1,
            fresh=True,
            timeout=300,
        ),
        Scenario(
            "peers50k",
            f"{total50k:,} peers at once on `workers = 2` with a Redis backplane "
            f"({described(spread50k)}; connected one transport after another, the server's "
            "memory read after each), 1 msg/s broadcast to all for 10 s",
            {
                "gateway": [
                    # 1 msg/s: 50,000 sends a second is about half of the one core that
                    # both workers share here; 2 msgs/s would saturate it (see notes.md).
                    *many_peers(workers, spread50k, workers["tcp"], ca, "1", "10"),
                    "--by-transport",
                ]
            },
            1,
            fresh=True,
            timeout=600,
            gateway="gateway-workers",
        ),
    ]


def described(spread: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in spread.items())


def many_peers(
    urls: dict[str, str],
    spread: dict[str, int],
    pub: str,
    ca: str,
    rate: str = "2",
    duration: str = "3",
) -> list[str]:
    """Bench arguments for ``sum(spread)`` subscribers over ``urls``, by the counts of
    ``spread``, a broadcast to all at ``rate`` msgs/s from ``pub`` (TLS trusting ``ca``), from 4
    processes and 8 source addresses (each process and the server within their descriptor
    limits)."""
    # Round-robin over the URLs, each repeated by its share: exact counts.
    unit = math.gcd(*spread.values())
    weighted = [url for name, url in urls.items() for _ in range(spread[name] // unit)]
    return [
        *[arg for url in weighted for arg in ("--sub", url)],
        "--pub",
        pub,
        "--ca",
        ca,
        "-n",
        str(sum(spread.values())),
        "--rate",
        rate,
        "--warmup",
        "1",
        "--duration",
        duration,
        "--procs",
        "4",
        "--sources",
        "8",
        "--connect-timeout",
        "300",
    ]
