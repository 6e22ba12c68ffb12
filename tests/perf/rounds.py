"""Running a scenario's rounds with ``gateway bench`` and reducing them to median figures."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.perf.scenarios import Scenario
from tests.perf.servers import BENCH_CPU, PYTHON, ROOT, Server


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
        # --churn: the slowest URL's connect-to-welcome p99, the clients not welcomed, and
        # the server's memory --settle seconds after the churn against before it.
        "churn_p99_ms": median_of(
            runs, lambda r: max(t["welcome_ms"]["p99"] for t in r["churn"]["targets"].values())
        ),
        "churn_welcomed": median_of(
            runs, lambda r: sum(t["welcomed"] for t in r["churn"]["targets"].values())
        ),
        "churn_failed": median_of(
            runs, lambda r: sum(t["failed"] for t in r["churn"]["targets"].values())
        ),
        "churn_rss_growth_bytes": median_of(
            runs, lambda r: r["churn"]["rss_after_bytes"] - r["churn"]["rss_start_bytes"]
        ),
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
        transports[name]["rss_per_peer_bytes"] = median_of(runs, _memory_of(name))
    out["transports"] = transports
    return out


def _transport_figure(name: str, path: str) -> Callable[[dict[str, Any]], Any]:
    def pick(run: dict[str, Any]) -> Any:
        value = run["transports"][name]
        for part in path.split("."):
            value = value[part]
        return value

    return pick


def _memory_of(name: str) -> Callable[[dict[str, Any]], Any]:
    """The server's memory per peer of one transport (``--by-transport``)."""

    def pick(run: dict[str, Any]) -> Any:
        return run["server"]["rss_per_peer_by_transport"][name]

    return pick
