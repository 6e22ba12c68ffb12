"""``gateway bench`` against the real gateway: it runs and reports sane figures (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

CONFIG = """
[[listeners]]
name = "tcp"
type = "tcp"
port = 0

[[listeners]]
name = "ws"
type = "ws"
port = 0

[[listeners]]
name = "udp"
type = "udp"
port = 0
"""


def bench(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--cpu", "none", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def gateway(run_gateway):
    return run_gateway(CONFIG)


def urls(gw) -> list[str]:
    return [
        "--sub",
        f"tcp://127.0.0.1:{gw.ports['tcp']}",
        "--sub",
        f"ws://127.0.0.1:{gw.ports['ws']}/ws",
        "--sub",
        f"udp://127.0.0.1:{gw.ports['udp']}",
    ]


def test_fixed_rate_over_tcp_ws_udp_loses_nothing(gateway):
    result = bench(
        *urls(gateway),
        "-n",
        "10",
        "--rate",
        "200",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--pid",
        str(gateway.proc.pid),
    )
    assert result["ok"]
    assert result["published"] > 0
    assert result["delivered_per_second"] > 0
    assert result["lost"] == 0
    assert {name: t["connected"] for name, t in result["transports"].items()} == {
        "tcp": 4,
        "ws": 3,
        "udp": 3,
    }
    for transport in result["transports"].values():
        assert transport["lost"] == 0
        assert transport["duplicated"] == 0
        assert transport["misordered"] == 0
        assert transport["delivered_per_second"] > 0
    latency = result["latency_ms"]
    assert latency["samples"] > 0
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p999"]
    server = result["server"]
    assert server["pid"] == gateway.proc.pid
    assert server["cpu_percent"] > 0
    assert server["rss_bytes"] > 1 << 20


def test_flood_delivers_everything_to_stream_subscribers(gateway):
    result = bench(
        *urls(gateway)[:4],
        "-n",
        "4",
        "--warmup",
        "0.1",
        "--duration",
        "0.5",
    )
    assert result["options"]["mode"] == "flood"
    assert result["delivered_per_second"] > 0
    assert result["lost"] == 0
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p999"]


def test_idle_reports_memory_per_peer(gateway):
    result = bench(
        *urls(gateway)[:2],
        "-n",
        "20",
        "--idle",
        "--settle",
        "0.2",
        "--pid",
        str(gateway.proc.pid),
    )
    assert result["transports"]["tcp"]["connected"] == 20
    assert result["server"]["rss_per_peer_bytes"] is not None


def test_bad_url_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--sub", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "unsupported URL" in done.stderr
