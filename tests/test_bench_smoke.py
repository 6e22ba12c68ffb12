"""``gateway bench`` against the real gateway: it runs and reports sane figures (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import make_certs
from tests.toml import toml_listener

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


@pytest.mark.parametrize("block", ["1", "256"])
def test_a_flood_in_other_blocks_arrives_whole_and_in_order(gateway, block):
    result = bench(*urls(gateway)[:4], "-n", "4", "--block", block, "--duration", "0.5")
    assert result["options"]["block"] == int(block)
    assert result["published"] % int(block) == 0 and result["published"] >= 2 * int(block)
    for transport in ("tcp", "ws"):
        figures = result["transports"][transport]
        assert figures["lost"] == figures["misordered"] == figures["duplicated"] == 0
        assert figures["received"] >= result["published"] * 2  # 2 subscribers each


def test_a_block_that_does_not_divide_256_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--sub", "tcp://127.0.0.1:1", "--block", "100"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "--block must be one of" in done.stderr


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


def test_churn_clients_get_the_welcome_and_leave(run_gateway):
    gw = run_gateway(CONFIG + toml_listener("churn", "tcp", welcome="hi {peer}"))
    result = bench(
        *urls(gw)[:2],
        "-n",
        "4",
        "--rate",
        "100",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--settle",
        "0.2",
        "--pid",
        str(gw.proc.pid),
        "--churn",
        f"50@tcp://127.0.0.1:{gw.ports['churn']}",
        "--churn",
        f"20@ws://127.0.0.1:{gw.ports['ws']}/ws",
    )
    assert result["lost"] == 0
    churn = result["churn"]
    tcp = churn["targets"][f"tcp://127.0.0.1:{gw.ports['churn']}"]
    ws = churn["targets"][f"ws://127.0.0.1:{gw.ports['ws']}/ws"]
    assert (tcp["attempted"], tcp["welcomed"], tcp["failed"]) == (50, 50, 0)
    assert (ws["attempted"], ws["welcomed"], ws["failed"]) == (20, 20, 0), ws["errors"]
    assert 0 < tcp["welcome_ms"]["p50"] <= tcp["welcome_ms"]["p99"]
    assert churn["rss_after_bytes"] > 1 << 20 and churn["rss_start_bytes"] > 1 << 20
    gw.wait_count(r"churn-\d+ connected from ", 50)


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


# Channels chosen by clients: JSON-lines subscribers and publishers, and a wildcard subscriber

CHANNELS_CONFIG = CONFIG + toml_listener("json", "tcp", format="json")
SHORT = ("--warmup", "0.1", "--duration", "0.4")


@pytest.fixture
def channels_gateway(run_gateway):
    return run_gateway(CHANNELS_CONFIG)


def on_channels(gw, *args: str) -> dict[str, Any]:
    """3 channels of 2 JSON subscribers each, one JSON publisher per channel."""
    return bench(
        "--sub",
        f"tcp://127.0.0.1:{gw.ports['json']}",
        "-n",
        "6",
        "-m",
        "3",
        "--channels",
        "3",
        "--publish-to",
        "ch.{i}",
        "--unsubscribe",
        "main",
        *args,
    )


def test_flood_on_channels_counts_each_channel_apart(channels_gateway):
    result = on_channels(channels_gateway, "--subscribe", "ch.{i}", *SHORT)
    published = result["published_by_channel"]
    assert len(published) == 3 and all(n > 0 for n in published)
    subscribers = result["transports"]["json-tcp"]
    assert subscribers["connected"] == 6
    # Each subscriber expects its own channel's messages only: 2 subscribers a channel.
    assert result["expected"] == subscribers["expected"] == 2 * sum(published)
    assert subscribers["received"] >= 2 * sum(published)
    assert result["lost"] == 0
    assert subscribers["duplicated"] == 0
    assert result["delivered_per_second"] > 0
    assert result["latency_ms"]["samples"] > 0


def test_at_a_fixed_rate_no_subscriber_gets_another_channels_messages(channels_gateway):
    result = on_channels(channels_gateway, "--subscribe", "ch.{i}", "--rate", "600", *SHORT)
    subscribers = result["transports"]["json-tcp"]
    assert result["lost"] == 0
    assert subscribers["duplicated"] == 0
    assert subscribers["foreign"] == 0
    assert subscribers["misordered"] == 0
    assert subscribers["latency_ms"]["samples"] > 0


def test_subscribers_of_every_channel_are_counted_as_extra(channels_gateway):
    # 'ch.*' matches all three channels: each subscriber gets the two others' messages too.
    result = on_channels(channels_gateway, "--subscribe", "ch.*", "--rate", "600", *SHORT)
    subscribers = result["transports"]["json-tcp"]
    assert result["lost"] == 0
    assert subscribers["foreign"] > 0
    assert subscribers["duplicated"] > 0


def test_a_wildcard_subscriber_next_to_raw_ones_gets_everything(channels_gateway):
    gw = channels_gateway
    result = bench(
        "--sub",
        f"tcp://127.0.0.1:{gw.ports['tcp']}",
        "-n",
        "4",
        "--wildcard",
        f"tcp://127.0.0.1:{gw.ports['json']}",
        *SHORT,
    )
    transports = result["transports"]
    assert transports["tcp"]["connected"] == 4
    assert transports["wild-tcp"]["connected"] == 1
    assert result["expected"] == 5 * result["published"]
    assert result["lost"] == 0
    assert transports["wild-tcp"]["duplicated"] == 0
    assert transports["wild-tcp"]["delivered_per_second"] > 0


GATEWAY_BENCH = [sys.executable, "-m", "gateway", "bench"]
CHANNEL_ARGS = ["-m", "2", "--channels", "2"]


def test_channels_need_a_way_to_choose_them():
    done = subprocess.run(
        [*GATEWAY_BENCH, "--sub", "tcp://127.0.0.1:1", "-n", "4", *CHANNEL_ARGS],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--channels" in done.stderr


# Binary stream peers: subscribers of a length-prefixed listener


def test_length_prefixed_subscribers_get_every_message_in_order(run_gateway):
    gw = run_gateway(
        CONFIG
        + toml_listener("u16", "tcp", framing="u16")
        + toml_listener("u32", "tcp", framing="u32")
    )
    result = bench(
        "--sub",
        f"tcp://127.0.0.1:{gw.ports['u16']}?framing=u16",
        "--sub",
        f"tcp://127.0.0.1:{gw.ports['u32']}?framing=u32",
        "--pub",
        f"tcp://127.0.0.1:{gw.ports['tcp']}",
        "-n",
        "4",
        *SHORT,
    )
    assert result["lost"] == 0
    for name in ("tcp-u16", "tcp-u32"):
        subscribers = result["transports"][name]
        assert subscribers["connected"] == 2
        assert subscribers["received"] >= subscribers["expected"] > 0
        assert subscribers["misordered"] == subscribers["duplicated"] == 0


def test_a_framing_on_a_websocket_url_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--sub", "ws://127.0.0.1:1/ws?framing=u32"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "?framing= takes lines, u16, u32, on tcp:// and tls://" in done.stderr


# DTLS subscribers: UDP sockets with a DTLS 1.2 session each


def test_dtls_subscribers_join_by_their_handshake_and_count_each_record(run_gateway, tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs)
    gw = run_gateway(CONFIG + toml_listener("dtls", certs=certs))
    result = bench(
        "--sub",
        f"tcp://127.0.0.1:{gw.ports['tcp']}",
        "--sub",
        f"dtls://127.0.0.1:{gw.ports['dtls']}",
        "--ca",
        str(certs / "ca.pem"),
        "-n",
        "6",
        "--rate",
        "300",
        *SHORT,
    )
    assert result["lost"] == 0
    dtls = result["transports"]["dtls"]
    assert dtls["connected"] == 3 and dtls["failed"] == 0
    assert dtls["received"] >= dtls["expected"] > 0
    assert dtls["misordered"] == dtls["duplicated"] == 0
    assert dtls["latency_ms"]["samples"] > 0
    # Each subscriber's close_notify at the end ends its session.
    for n in range(1, 4):
        gw.wait_for(rf"dtls-{n} left \(closed by the peer\)")


def test_dtls_subscribers_refuse_a_gateway_they_cannot_verify(run_gateway, tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs)
    other = tmp_path / "other"
    make_certs(other)
    gw = run_gateway(CONFIG + toml_listener("dtls", certs=certs))
    done = subprocess.run(
        [
            *GATEWAY_BENCH,
            "--cpu",
            "none",
            "--sub",
            f"dtls://127.0.0.1:{gw.ports['dtls']}",
            "--pub",
            f"tcp://127.0.0.1:{gw.ports['tcp']}",
            "--ca",
            str(other / "ca.pem"),
            "-n",
            "1",
            "--connect-timeout",
            "5",
            *SHORT,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "not trusted" in done.stderr + done.stdout


def test_the_dtls_subscribers_clock_runs_timers_on_the_bench_loop():
    from gateway.bench.clock import SECOND, now_ns
    from gateway.bench.dtls import LoopClock
    from gateway.bench.loop import Loop

    loop = Loop()
    clock = LoopClock(loop)
    fired: dict[str, int] = {}

    def fire(name: str) -> None:
        fired[name] = now_ns()

    start = now_ns()
    clock.callLater(0.01, fire, "first")
    moved = clock.callLater(0.02, fire, "moved")
    cancelled = clock.callLater(0.01, fire, "cancelled")
    cancelled.cancel()
    moved.reset(0.05)
    assert len(clock.getDelayedCalls()) == 2
    assert loop.run_until(lambda: len(fired) == 2, now_ns() + 2 * SECOND)
    assert list(fired) == ["first", "moved"]
    assert fired["moved"] - start >= SECOND // 20  # not at its first time
    assert clock.getDelayedCalls() == [] and not moved.active()
    loop.close()


def test_a_supervisors_pid_counts_its_workers_and_memory_is_read_per_transport(
    run_gateway, redis_server
):
    from tests.test_workers import start_workers

    gw = start_workers(run_gateway, redis_server)
    result = bench(
        *urls(gw),
        "-n",
        "30",
        "--rate",
        "20",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--by-transport",
        "--settle",
        "0.2",
        "--pid",
        str(gw.proc.pid),
    )
    assert result["lost"] == 0
    assert {name: t["connected"] for name, t in result["transports"].items()} == {
        "tcp": 10,
        "ws": 10,
        "udp": 10,
    }
    server = result["server"]
    assert set(server["rss_per_peer_by_transport"]) == {"tcp", "ws", "udp"}
    with open(f"/proc/{gw.proc.pid}/status") as f:
        supervisor = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    # The supervisor and its two workers, each a whole Python process.
    assert server["rss_bytes"] > 2.5 * supervisor


def test_by_transport_needs_the_servers_pid():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--sub", "tcp://127.0.0.1:1", "--by-transport"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "--by-transport" in done.stderr and "--pid" in done.stderr
