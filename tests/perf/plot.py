"""The plot of a full run: deliveries per second by scenario and server, and latency."""

from __future__ import annotations

from typing import Any

from tests.perf.servers import ROOT

PLOT = ROOT / "docs" / "images" / "benchmarks.png"


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
