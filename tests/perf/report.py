"""The markdown report of a full run (docs/benchmarks.md) and the pieces of it that a
partial run merges in: target rows, figure rows, scenario lines, the recorded baseline."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.perf.formatting import format_count, format_ms, format_rate
from tests.perf.scenarios import REFERENCE
from tests.perf.servers import BENCH_CPU, ROOT, SERVER_CPU
from tests.perf.targets import Check, checks

DOC = ROOT / "docs" / "benchmarks.md"
COMMAND = ".venv/bin/python -m tests.perf.run"
NOTES = Path(__file__).with_name("notes.md")


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
                    f"| {key} | {name} | {format_rate(old.get('delivered_per_second'))} → "
                    f"{format_rate(f.get('delivered_per_second'))} | {format_ms(old.get('p99_ms'))} → {format_ms(f.get('p99_ms'))} |"
                )
    if NOTES.exists():
        lines += ["", NOTES.read_text().strip()]
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
        "- peers50k runs `gateway-workers`: `workers = 2` with a Redis backplane (a",
        "  `redis-server` the suite starts, also on CPU 0), both workers pinned to CPU 0 with",
        "  the supervisor; server CPU and memory are those of the supervisor and its workers.",
        "  Its peers connect one transport after another (`gateway bench --by-transport`), the",
        "  server's RSS read `--settle` seconds after each: memory per peer by transport.",
        "- Messages are 100-byte payloads carrying publisher, sequence number and send time.",
        "  Flood is closed-loop: the publisher stays at most 2,000 messages ahead of the slowest",
        "  stream subscriber, so no server hits a slow-consumer limit. Latency in flood runs is",
        "  sampled (the last message of each read) and mostly measures that queue; at a fixed",
        "  rate every message is timed and sequence-checked.",
        "- Comparison servers, all in `tests/perf/`: `tutorial_server.py` (Twisted",
        "  `LineReceiver`, a client list, one `sendLine` per receiver), `autobahn_server.py`",
        "  (Autobahn's broadcast example: one `sendMessage` per client; fed by a TCP line",
        "  publisher), `raw_server.py` (no framework: each read's whole lines `sendall`-ed to each",
        "  client, one `sendto` per datagram per UDP peer — a ceiling, not a usable server; in",
        "  the latency scenario, where each read is one message, it is the floor of a Python",
        "  server: one `send` per receiver per message), and",
        "  nats-server driven over its own protocol (`nats://`, and `nats+ws://` for its",
        "  WebSocket) by the same generator.",
        "- TLS ceiling (tls100, wss100: run `tlsceiling`): `tls_server.py`, pyOpenSSL and an",
        "  epoll loop, no framework. A plain-TCP publisher's reads are cut at the last newline",
        "  and the batch, framed once (as it is on the tls port; each line an unmasked text frame",
        "  on the wss port, after the HTTP upgrade), goes to every receiver with ONE",
        "  `Connection.send` (`SSL_write`); what a socket does not take waits in that receiver's",
        "  buffer (bounded at 16 MiB). Same dev certificate as the gateway's tls and wss",
        "  listeners; the gateway runs are fed by a TCP publisher on its tcp listener.",
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
        "- Churn (churn): `--churn 1000@tcp://...` and `--churn 300@ws://...`: a process of its own",
        "  opens that many clients a second for the measured window, each waiting for its welcome",
        "  (a line from one more `tcp` listener, `churn`, with a `welcome`; the `gateway.v1.json`",
        "  welcome event on `ws`; nats-server's `INFO` over `nats://` and `nats+ws://`) and then",
        "  closing; it reports connect-to-welcome percentiles and failures per URL, and the",
        "  server's memory at the start of the window and `--settle` (2) seconds after the churn.",
        "- Wildcard (wild): tcp100 plus `--wildcard URL`, one JSON-lines subscriber to `>` on",
        "  the JSON listener, which expects every message; the publisher also stays at most",
        "  2,000 messages ahead of it.",
        '- Length-prefixed (u32): one more `tcp` listener with `framing = "u32"`; its 100',
        "  subscribers (`--sub tcp://...?framing=u32`) read 4-byte big-endian lengths, fed by a",
        "  lines publisher on the plain `tcp` listener (the same channel).",
        "- History (hist): one more `tcp` listener on channel `hist`, which keeps",
        "  `history = 1000` in memory: every batch is numbered and kept, the oldest forgotten.",
        "  Each run on a fresh server (a later round's subscribers would get the last 1,000 first).",
        "- History in sqlite (hist_sqlite): a second gateway process (`gateway-sqlite.toml`) with",
        '  `[history] store = "sqlite:history.db"` and one `tcp` listener on channel `hist`',
        "  (`history = 1000`), started on an empty file for each run.",
        f"- `{REFERENCE}`: a tcp100 run inside the ch1000, wild, u32, hist and hist_sqlite scenarios, in alternating",
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
                f"{format_ms(f['p50_ms'])} / {format_ms(f['p99_ms'])} / {format_ms(f['p999_ms'])}"
                if f.get("p50_ms") is not None
                else "-"
            )
            cpu = f"{f['server_cpu_percent']:.0f}%" if f.get("server_cpu_percent") else "-"
            client = f"{f['client_cpu_percent']:.0f}%" if f.get("client_cpu_percent") else "-"
            errors = f" (errors: {len(f['errors'])})" if f.get("errors") else ""
            lines.append(
                f"| {key} | {name}{errors} | {format_rate(f['delivered_per_second'])} | "
                f"{format_count(f['lost'])} | {latency} | {cpu} | {format_count(f['ns_per_delivery'])} | {client} | {memory} |"
            )
            if len(f.get("transports", {})) > 1:
                for transport, t in f["transports"].items():
                    per = t.get("rss_per_peer_bytes")
                    memory = f"{per / 1024:.1f} KiB/peer" if per is not None else ""
                    lines.append(
                        f"| | ↳ {transport} ({format_count(t['connected'])} peers) | {format_rate(t['delivered_per_second'])} | "
                        f"{format_count(t['lost'])} | p99 {format_ms(t['p99_ms'])} | | | | {memory} |"
                    )
    return lines


def targets_met(lines: list[str]) -> str:
    """The sentence under the Targets table, from its rows among ``lines``."""
    rows = [line for line in lines if first_cell(line) and line.startswith("| ")]
    rows = [r for r in rows if r.count("|") == 6 and r.split("|")[1].strip() != "scenario"]
    met = [r for r in rows if r.rstrip().endswith("**yes** |")]
    missed = [r.split("|") for r in rows if r.rstrip().endswith("**no** |")]
    text = f"{len(met)} of {len(rows)} targets met"
    if missed:
        text += ": missed " + "; ".join(f"{c[1].strip()} ({c[2].strip()})" for c in missed)
    return text + "."


def first_cell(line: str) -> str | None:
    """The first cell of a table row (None: not a row, or the header's rule)."""
    if not line.startswith("|") or line.startswith("|---"):
        return None
    return line.split("|")[1].strip()


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
