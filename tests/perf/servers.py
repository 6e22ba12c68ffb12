"""The servers under test (gateway, nats-server, and the comparison servers of this folder):
their ports and configuration, starting each pinned to the server CPU, and stopping it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.toml import toml_listener, toml_table

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SERVER_CPU = 0
BENCH_CPU = 1


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_to_server_cpu() -> None:
    os.sched_setaffinity(0, {SERVER_CPU})


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
    needs: Server | None = None  # started before this one, stopped after it (redis-server)

    def start(self, workdir: Path) -> None:
        if self.needs is not None:
            self.needs.start(workdir)
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
        if self.needs is not None:
            self.needs.stop()


class Ports:
    """The ports of one comparison run, chosen once."""

    def __init__(self) -> None:
        self.gw_tcp = free_port()
        self.gw_json = free_port()
        self.gw_churn = free_port()
        self.gw_u32 = free_port()
        self.gw_hist = free_port()
        self.gw_sqlite = free_port()
        self.gw_tls = free_port()
        self.gw_udp = free_port(socket.SOCK_DGRAM)
        self.gw_dtls = free_port(socket.SOCK_DGRAM)
        self.gw_ws = free_port()
        self.gw_wss = free_port()
        self.nats = free_port()
        self.nats_ws = free_port()
        self.tutorial = free_port()
        self.raw = free_port()
        self.raw_udp = free_port(socket.SOCK_DGRAM)
        self.autobahn_tcp = free_port()
        self.autobahn_ws = free_port()
        self.tls_ceiling = free_port()
        self.wss_ceiling = free_port()
        self.tls_ceiling_pub = free_port()
        self.redis = free_port()
        # The workers' gateway (workers = 2 sharing each port, a Redis backplane).
        self.wk_tcp = free_port()
        self.wk_tls = free_port()
        self.wk_udp = free_port(socket.SOCK_DGRAM)
        self.wk_ws = free_port()
        self.wk_wss = free_port()


def secure(name: str, port: int, **settings: int) -> str:
    """A TLS listener (tls, dtls, wss) on the dev certificate of the working folder, made
    if missing."""
    return toml_listener(name, port=port, certs="certs", generate_dev_cert=True, **settings)


def gateway_config(ports: Ports) -> str:
    return (
        "# gateway bench configuration: defaults, but room for 20,000 peers.\n"
        + toml_table("gateway", name="bench")
        + toml_table("limits", max_connections=30000)
        + toml_table("channels.hist", history=1000)
        + toml_listener("tcp", port=ports.gw_tcp)
        + toml_listener("json", "tcp", port=ports.gw_json, format="json")
        + toml_listener("churn", "tcp", port=ports.gw_churn, welcome="welcome {peer}")
        + toml_listener("u32", "tcp", port=ports.gw_u32, framing="u32")
        + toml_listener("hist", "tcp", port=ports.gw_hist, channel="hist")
        + secure("tls", ports.gw_tls)
        + toml_listener("udp", port=ports.gw_udp, max_peers=20000)
        + secure("dtls", ports.gw_dtls, max_peers=20000)
        + toml_listener("ws", port=ports.gw_ws)
        + secure("wss", ports.gw_wss)
    )


def sqlite_config(ports: Ports) -> str:
    return (
        "# gateway bench configuration: one channel keeping history in the sqlite store.\n"
        + toml_table("gateway", name="bench")
        + toml_table("history", store="sqlite:history.db")
        + toml_table("channels.hist", history=1000)
        + toml_listener("tcp", port=ports.gw_sqlite, channel="hist")
    )


def workers_config(ports: Ports) -> str:
    return (
        "# gateway bench configuration: 2 workers on every port, a Redis backplane, room for\n"
        "# 50,000 peers (each worker's own limits).\n"
        + toml_table("gateway", name="bench", workers=2)
        + toml_table("cluster", redis=f"redis://127.0.0.1:{ports.redis}", node="bench")
        + toml_table("limits", max_connections=30000)
        + toml_listener("tcp", port=ports.wk_tcp)
        + secure("tls", ports.wk_tls)
        + toml_listener("udp", port=ports.wk_udp, max_peers=30000)
        + toml_listener("ws", port=ports.wk_ws)
        + secure("wss", ports.wk_wss)
    )


def servers(ports: Ports, workdir: Path) -> dict[str, Server]:
    (workdir / "gateway.toml").write_text(gateway_config(ports))
    (workdir / "gateway-sqlite.toml").write_text(sqlite_config(ports))
    (workdir / "gateway-workers.toml").write_text(workers_config(ports))
    redis = Server(
        "redis",
        ["redis-server", "--port", str(ports.redis), "--bind", "127.0.0.1", "--save", ""],
        r"Ready to accept connections",
    )
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
        # Starts on an empty file each time: a fresh run measures a fresh store.
        "gateway-sqlite": Server(
            "gateway-sqlite",
            [
                "sh",
                "-c",
                'rm -f history.db history.db-*; exec "$0" -m gateway --config gateway-sqlite.toml',
                PYTHON,
            ],
            r"gateway 'bench' .* running",
        ),
        # The supervisor logs its workers' lines: ready once both reach Redis.
        "gateway-workers": Server(
            "gateway-workers",
            [PYTHON, "-m", "gateway", "--config", str(workdir / "gateway-workers.toml")],
            r"(?s)backplane up: .*backplane up: ",
            needs=redis,
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
        # The gateway's dev certificate: run.py starts the gateway once to make it first.
        "tlsceiling": Server(
            "tlsceiling",
            [
                PYTHON,
                "-m",
                "tests.perf.tls_server",
                str(ports.tls_ceiling),
                str(ports.wss_ceiling),
                str(ports.tls_ceiling_pub),
                str(workdir / "certs" / "server.pem"),
                str(workdir / "certs" / "server.key"),
            ],
            r"listening",
            cwd=ROOT,
        ),
    }
