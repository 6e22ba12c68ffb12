"""The result for a person: latency percentiles, and the few lines of ``describe``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def percentiles(parts: Iterable[Iterable[int]]) -> dict[str, Any]:
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


def si(value: float) -> str:
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
            f"  delivered  {si(result['delivered_per_second'])} msgs/s over "
            f"{result['window_seconds']:.2f} s (published {si(result['published_per_second'])}/s)",
            f"  loss       {result['lost']} of {result['expected']} "
            f"({100 * result['loss_ratio']:.4f}%)",
            f"  latency    p50 {_ms(latency['p50'])} ms  p99 {_ms(latency['p99'])} ms  "
            f"p99.9 {_ms(latency['p999'])} ms  ({latency['samples']} samples)",
        ]
    for name, t in transports.items():
        latency = t["latency_ms"]
        extra = f"  failed {t['failed']}" if t["failed"] else ""
        extra += f"  disconnected {t['disconnected']}" if t["disconnected"] else ""
        extra += f"  duplicated {t['duplicated']}" if t.get("duplicated") else ""
        extra += f"  foreign {t['foreign']}" if t.get("foreign") else ""
        lines.append(
            f"  {name:8} {t['connected']:6} connected  {si(t['delivered_per_second']):>8} msgs/s  "
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
        by_transport = server.get("rss_per_peer_by_transport")
        if by_transport:
            each = ", ".join(f"{name} {per / 1024:.1f}" for name, per in by_transport.items())
            lines.append(f"  memory     KiB per peer: {each}")
    lines.append(f"  client     CPU {result['client']['cpu_percent']:.0f}%")
    return "\n".join(lines)
