"""The targets the gateway is held to, checked against a run's median figures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.perf.formatting import format_count, format_ms, format_rate
from tests.perf.scenarios import REFERENCE


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
                f"{format_rate(gw)} vs {format_rate(other)} deliveries/s",
                f"{r:.2f}x" if r is not None else "-",
                None if r is None else r >= factor,
            )
        )

    def cost(scenario: str, versus: str, factor: float, label: str, of: str = "") -> None:
        """Server CPU per delivery of the gateway in ``scenario`` against ``versus``'s (in
        scenario ``of``, by default the same)."""
        gw = get(scenario, "gateway", "ns_per_delivery")
        other = get(of or scenario, versus, "ns_per_delivery")
        r = ratio(gw, other)
        out.append(
            Check(
                scenario,
                f"server CPU per delivery ≤ {label}",
                f"{format_count(gw)} vs {format_count(other)} ns",
                f"{r:.2f}x" if r is not None else "-",
                None if r is None else r <= factor,
            )
        )

    throughput("tcp100", "nats", 2.5, "nats-server")
    throughput("tcp100", "tutorial", 15, "tutorial Twisted server")
    throughput("tcp1000", "nats", 2, "nats-server")
    throughput("ws100", "autobahn", 15, "Autobahn sendMessage loop")
    throughput("ws100", "nats", 0.7, "nats-server (its WebSocket)")
    cost("ws100", "gateway", 1.5, "1.5x tcp100's", of="tcp100")
    throughput("tls100", "tlsceiling", 0.8, "TLS ceiling (one SSL_write per receiver)")
    throughput("wss100", "tlsceiling", 0.8, "TLS ceiling, WebSocket frames")
    udp = table.get("mixed", {}).get("gateway", {}).get("transports", {}).get("udp", {})
    udp_rate = udp.get("delivered_per_second")
    ceiling = get("mixed", "raw", "delivered_per_second")
    r = ratio(udp_rate, ceiling)
    out.append(
        Check(
            "mixed",
            "UDP near the one-sendto-per-datagram limit (raw sendto loop, 25 peers)",
            f"{format_rate(udp_rate)} vs {format_rate(ceiling)} datagrams/s",
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
            f"{format_ms(gw_p99)} vs {format_ms(nats_p99)} ms, lost {lost}",
            f"{ratio(gw_p99, nats_p99):.2f}x" if ratio(gw_p99, nats_p99) is not None else "-",
            None if gw_p99 is None or nats_p99 is None else gw_p99 <= nats_p99 and lost == 0,
        )
    )
    cost("latency", "nats", 1.0, "nats-server's")
    cost(
        "latency",
        "raw",
        1.2,
        "1.2x a minimal Python server (one send per receiver per message)",
    )
    lost, failed = get("churn", "gateway", "lost_max"), get("churn", "gateway", "churn_failed")
    welcomed = get("churn", "gateway", "churn_welcomed")
    out.append(
        Check(
            "churn",
            "no loss for the steady subscribers; every churning client welcomed",
            f"lost {lost}; {format_count(welcomed)} welcomed, {format_count(failed)} failed",
            "-",
            None if lost is None or failed is None else lost == 0 and failed == 0,
        )
    )
    gw_p99, nats_p99 = get("churn", "gateway", "churn_p99_ms"), get("churn", "nats", "churn_p99_ms")
    r = ratio(gw_p99, nats_p99)
    out.append(
        Check(
            "churn",
            "connect-to-welcome p99 reported (the slower of tcp and ws; vs nats-server's)",
            f"{format_ms(gw_p99)} vs {format_ms(nats_p99)} ms",
            f"{r:.2f}x" if r is not None else "-",
            None if gw_p99 is None else True,
        )
    )
    growth = get("churn", "gateway", "churn_rss_growth_bytes")
    out.append(
        Check(
            "churn",
            "RSS back within 5 MiB of where it started (no leak)",
            f"{growth / 2**20:+.2f} MiB" if growth is not None else "-",
            "-",
            None if growth is None else growth <= 5 * 2**20,
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
    for key, wanted, label in (
        ("peers20k", 20000, "20,000 peers at once, broadcast reaches all"),
        (
            "peers50k",
            50000,
            "50,000 peers at once (workers = 2, Redis), broadcast reaches all; memory per "
            "peer by transport",
        ),
    ):
        connected = get(key, "gateway", "connected")
        lost = get(key, "gateway", "lost_max")
        transports = table.get(key, {}).get("gateway", {}).get("transports", {})
        by_transport = sum(t.get("connected") or 0 for t in transports.values())
        memory = ", ".join(
            f"{name} {t['rss_per_peer_bytes'] / 1024:.1f}"
            for name, t in transports.items()
            if t.get("rss_per_peer_bytes") is not None
        )
        out.append(
            Check(
                key,
                label,
                f"{format_count(connected)} connected, lost {lost}"
                + (f"; KiB per peer: {memory}" if memory else ""),
                "-",
                None
                if connected is None
                else connected >= wanted and lost == 0 and by_transport >= wanted,
            )
        )
    throughput("ch1000", REFERENCE, 0.7, "tcp100 deliveries/s (same run)")
    throughput("u32", REFERENCE, 0.9, "tcp100 deliveries/s (same run, lines subscribers)")
    throughput("hist", REFERENCE, 0.85, "tcp100 deliveries/s (same run, no history)")
    throughput("hist_sqlite", REFERENCE, 0.7, "tcp100 deliveries/s (same run, no history)")
    wild = get("wild", "gateway", "delivered_per_second")
    single = get("wild", REFERENCE, "delivered_per_second")
    r = ratio(wild, single)
    out.append(
        Check(
            "wild",
            "≈ tcp100 (ratio reported; same run, 101 vs 100 subscribers)",
            f"{format_rate(wild)} vs {format_rate(single)} deliveries/s",
            f"{r:.2f}x" if r is not None else "-",
            None if r is None else r >= 0.9,
        )
    )
    return out
