"""The result of one run of ``gateway bench``: every group's figures merged by transport,
and the server's CPU and memory over the measured window."""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gateway.bench.clock import SECOND
from gateway.bench.report import percentiles

if TYPE_CHECKING:
    from gateway.bench.runner import Bench


def summarize(
    bench: Bench, results: list[dict[str, Any]], baseline_rss: int | None, connect_seconds: float
) -> dict[str, Any]:
    options = bench.options
    merged: dict[str, dict[str, Any]] = {}
    for group_result in results:
        for transport, part in group_result["transports"].items():
            latencies = part["latencies"]
            if isinstance(latencies, bytes):
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
    start, end = bench.marks.get("start"), bench.marks.get("end")
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
            "foreign": part["foreign"],
            "expected": part["expected"],
            "latency_ms": percentiles(part["latencies"]),
            "errors": sorted(set(part["errors"]))[:5],
        }
    lost = sum(t["lost"] for t in transports.values())
    expected = sum(part["expected"] for part in merged.values())
    result: dict[str, Any] = {
        "tool": "gateway bench",
        "options": options.summary(),
        "connect_seconds": round(connect_seconds, 3),
        "window_seconds": round(window, 4),
        "published": bench.published,
        "published_by_channel": bench.published_by if options.channels <= 100 else None,
        "published_per_second": (end["published"] - start["published"]) / window
        if start and end and window
        else 0.0,
        "delivered_per_second": delivered / window if window else 0.0,
        "expected": expected,
        "lost": lost,
        "loss_ratio": lost / expected if expected else 0.0,
        "latency_ms": percentiles(all_latencies),
        "transports": transports,
    }
    client_cpu = (end["cpu"] - start["cpu"]) if start and end else 0
    client_cpu += sum(r.get("cpu_ns", 0) for r in results if len(bench.groups) > 1)
    result["client"] = {
        "cpu_percent": 100.0 * client_cpu / (window * SECOND) if window else 0.0,
        "processes": len(bench.groups) + (1 if len(bench.groups) > 1 else 0),
    }
    if bench.server is not None:
        server: dict[str, Any] = {"pid": bench.server.pid, "rss_baseline_bytes": baseline_rss}
        if start and end and window:
            cpu = end["server_cpu"] - start["server_cpu"]
            server["cpu_percent"] = 100.0 * cpu / (window * SECOND)
            server["cpu_ns_per_delivery"] = cpu / delivered if delivered else None
            server["rss_bytes"] = end["server_rss"]
        idle = bench.marks.get("idle")
        if idle is not None:
            peers = sum(t["connected"] for t in transports.values())
            server["rss_bytes"] = idle["server_rss"]
            assert baseline_rss is not None
            server["rss_per_peer_bytes"] = (
                (idle["server_rss"] - baseline_rss) / peers if peers else None
            )
        if bench.memory:
            server["rss_per_peer_by_transport"] = {
                transport: part["rss_bytes"] / part["peers"]
                for transport, part in bench.memory.items()
            }
        result["server"] = server
    if bench.churn_result is not None:
        churned = dict(bench.churn_result)
        if start is not None and "server_rss" in start:
            churned["rss_start_bytes"] = start["server_rss"]
        result["churn"] = churned
    failed = sum(t["failed"] for t in transports.values())
    result["ok"] = failed == 0 and all(t["disconnected"] == 0 for t in transports.values())
    return result
