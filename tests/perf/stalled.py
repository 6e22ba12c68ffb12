"""Throughput of readers that keep up while another one is stalled (issue: at least 90%).

    .venv/bin/python -m tests.perf.stalled

For each slow-consumer policy, runs `gateway bench` (50 TCP subscribers, flood, 4 s) against a
gateway pinned to CPU 0, twice without and twice with one extra reader that has a 4 KiB receive
buffer and never reads, and prints deliveries/s. Not part of CI: a measurement, not a test.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

GATEWAY = [sys.executable, "-m", "gateway"]


def run(policy: str, stalled: int, folder: Path) -> float:
    config = folder / f"stall-{policy}.toml"
    config.write_text(
        f'[limits]\nslow_consumer = "{policy}"\n[[listeners]]\nname = "tcp"\ntype = "tcp"\nport = 0\n'
    )
    gateway = subprocess.Popen(
        ["taskset", "-c", "0", *GATEWAY, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert gateway.stdout is not None
        port = 0
        for line in gateway.stdout:
            if m := re.search(rb"listening tcp 127.0.0.1:(\d+)", line):
                port = int(m.group(1))
                break
        readers = []
        for _ in range(stalled):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", port))
            readers.append(reader)
        bench = subprocess.run(
            [
                *GATEWAY,
                "bench",
                "--sub",
                f"tcp://127.0.0.1:{port}",
                "-n",
                "50",
                "--duration",
                "4",
                "--json",
                "--cpu",
                "1",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(json.loads(bench.stdout)["delivered_per_second"])
    finally:
        gateway.terminate()
        gateway.wait()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for policy in ("disconnect", "drop"):
            alone = [run(policy, 0, folder) for _ in range(2)]
            with_stalled = [run(policy, 1, folder) for _ in range(2)]
            ratio = sum(with_stalled) / sum(alone)
            print(
                f"{policy}: without a stalled reader {[f'{x / 1e6:.2f}M' for x in alone]}, "
                f"with one {[f'{x / 1e6:.2f}M' for x in with_stalled]}: {ratio:.0%}"
            )


if __name__ == "__main__":
    main()
