"""Churn for ``gateway bench --churn RATE@URL``: clients that connect, wait for the welcome
and leave, RATE of them a second per URL, while the run's broadcast goes on.

It runs as a process of its own (``gateway.bench.churn.main``), so its work
never slows the run's subscribers and publishers; it prints one JSON object when done.
Each client's time is from its ``connect`` to its welcome:

- ``tcp://``: the first line the server sends (a gateway listener needs a ``welcome``);
- ``ws://``: the first frame after the upgrade, with the ``gateway.v1.json`` subprotocol
  (the gateway's ``welcome`` event);
- ``nats://`` and ``nats+ws://``: nats-server's ``INFO`` (a line, or the first frame).

Then it closes the socket. A client without its welcome within ``TIMEOUT`` counts failed.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import selectors
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from gateway.bench.clock import SECOND, now_ns
from gateway.bench.report import percentiles
from gateway.bench.target import BenchError, Target

TIMEOUT = 5 * SECOND
CHURN_SCHEMES = ("tcp", "ws", "nats", "nats+ws")


def parse_churn(spec: str) -> tuple[int, Target]:
    """``RATE@URL``: RATE clients a second at URL (tcp://, ws://, nats://, nats+ws://)."""
    rate, at, url = spec.partition("@")
    if not at or not rate.isdigit() or int(rate) <= 0:
        raise BenchError(f"bad --churn {spec!r}: expected RATE@URL, e.g. 1000@tcp://HOST:PORT")
    target = Target.parse(url)
    if target.scheme not in CHURN_SCHEMES:
        raise BenchError(f"bad --churn {spec!r}: churn takes {', '.join(CHURN_SCHEMES)} URLs")
    return int(rate), target


@dataclass
class _Client:
    target: Target
    sock: socket.socket
    started: int
    buffer: bytes = b""
    upgraded: bool = False
    sent: bool = False


@dataclass
class _Tally:
    attempted: int = 0
    welcomed: int = 0
    failed: int = 0
    latencies: list[int] = field(default_factory=list)
    errors: set[str] = field(default_factory=set)


def _upgrade(target: Target) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    protocol = "" if target.scheme == "nats+ws" else "Sec-WebSocket-Protocol: gateway.v1.json\r\n"
    return (
        f"GET {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
    ).encode()


def _welcomed(client: _Client) -> bool | None:
    """True once the welcome is in, False on a bad answer, None while waiting."""
    data = client.buffer
    if client.target.scheme in ("tcp", "nats"):
        return True if b"\n" in data else None
    if not client.upgraded:
        head, found, rest = data.partition(b"\r\n\r\n")
        if not found:
            return None
        if not head.startswith(b"HTTP/1.1 101"):
            return False
        client.upgraded, data = True, rest
        client.buffer = rest
    if len(data) < 2:
        return None
    length, offset = data[1] & 0x7F, 2
    if length == 126:
        length, offset = int.from_bytes(data[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(data[2:10], "big"), 10
    return True if len(data) >= offset + length else None


def run(targets: list[tuple[int, Target]], start: int, end: int) -> dict[str, Any]:
    """Churn from ``start`` to ``end`` (monotonic ns); what each URL saw."""
    selector = selectors.DefaultSelector()
    tallies = {str(target): _Tally() for _, target in targets}
    intervals = [(SECOND // rate, target) for rate, target in targets]
    due = [start] * len(targets)
    live: dict[int, _Client] = {}

    def finish(client: _Client, ok: bool, error: str = "") -> None:
        selector.unregister(client.sock)
        del live[client.sock.fileno()]
        client.sock.close()
        tally = tallies[str(client.target)]
        if ok:
            tally.welcomed += 1
            tally.latencies.append(now_ns() - client.started)
        else:
            tally.failed += 1
            tally.errors.add(error)

    while True:
        now = now_ns()
        if now >= end and not live:
            break
        for index, (interval, target) in enumerate(intervals):
            while due[index] <= min(now, end - 1):
                due[index] += interval
                sock = socket.socket()
                sock.setblocking(False)
                tallies[str(target)].attempted += 1
                code = sock.connect_ex((target.host, target.port))
                if code not in (0, errno.EINPROGRESS):
                    sock.close()
                    tallies[str(target)].failed += 1
                    tallies[str(target)].errors.add(os.strerror(code))
                    continue
                client = _Client(target, sock, now_ns())
                live[sock.fileno()] = client
                selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        for client in [c for c in live.values() if now - c.started > TIMEOUT]:
            finish(client, False, "no welcome in time")
        wake = min([d for d in due if d < end] or [end])
        for key, events in selector.select(max(0.0, (wake - now_ns()) / SECOND)):
            client = key.data
            if events & selectors.EVENT_WRITE and not client.sent:
                client.sent = True
                if client.target.scheme in ("ws", "nats+ws"):
                    try:
                        client.sock.send(_upgrade(client.target))
                    except OSError as e:
                        finish(client, False, str(e))
                        continue
                selector.modify(client.sock, selectors.EVENT_READ, client)
            if events & selectors.EVENT_READ:
                try:
                    data = client.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    finish(client, False, str(e))
                    continue
                if not data:
                    finish(client, False, "closed before the welcome")
                    continue
                client.buffer += data
                verdict = _welcomed(client)
                if verdict is not None:
                    status = client.buffer.split(b"\r\n", 1)[0].decode("latin-1")
                    finish(client, verdict, "" if verdict else f"upgrade refused: {status}")
    return {
        url: {
            "attempted": t.attempted,
            "welcomed": t.welcomed,
            "failed": t.failed,
            "per_second": t.attempted * SECOND / (end - start) if end > start else 0.0,
            "welcome_ms": percentiles([t.latencies]),
            "errors": sorted(t.errors)[:5],
        }
        for url, t in tallies.items()
    }


def spawn(specs: list[str], start: int, end: int) -> subprocess.Popen[str]:
    """Start a churn process for ``specs`` (``RATE@URL``) from ``start`` to ``end``."""
    spec = json.dumps({"churn": specs, "start": start, "end": end})
    return subprocess.Popen(
        [sys.executable, "-c", "from gateway.bench.churn import main; main()", spec],
        stdout=subprocess.PIPE,
        text=True,
    )


def collect(churn: subprocess.Popen[str]) -> dict[str, Any]:
    """What a churn process saw, once it is done."""
    out, _ = churn.communicate(timeout=60)
    if churn.returncode != 0:
        raise BenchError(f"the churn process failed (status {churn.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    targets = [parse_churn(item) for item in spec["churn"]]
    sys.stdout.write(json.dumps(run(targets, int(spec["start"]), int(spec["end"]))) + "\n")


if __name__ == "__main__":
    main()
