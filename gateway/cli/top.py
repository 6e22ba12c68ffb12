"""``gateway top``: the gateway at a glance in a terminal, as ``nats-top`` shows nats-server.

Totals at the top (peers, connections per transport, messages in and delivered per
second, drops), the busiest peers below (messages in and out per second, pending
bytes, age), refreshed every ``--interval`` seconds from the admin API (``/stats``
and ``/peers``). Keys: ``i``/``o``/``p``/``a`` sort by rate in, rate out, pending
or age; ``q`` quits. ``--once`` prints one view (two samples ``--interval`` apart)
as plain text and exits, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

COMMANDS = ("top",)
SORTS = {"in": "in/s", "out": "out/s", "pending": "pending", "age": "age"}
KEYS = {"i": "in", "o": "out", "p": "pending", "a": "age"}
DESCRIPTION = (
    "The gateway at a glance: totals and the busiest peers, refreshed every second from the "
    "admin API. Keys: i, o, p, a sort by rate in, rate out, pending bytes, age; q quits."
)


def add_commands(commands: Any) -> None:
    """Add ``top`` to the ``gateway`` command's subparsers."""
    top = commands.add_parser(
        "top", help="a live terminal view of a gateway", description=DESCRIPTION
    )
    top.add_argument(
        "--admin",
        default="http://127.0.0.1:9100",
        metavar="URL",
        help="the gateway's [admin] listener (default http://127.0.0.1:9100)",
    )
    top.add_argument(
        "--token",
        default=os.environ.get("GATEWAY_ADMIN_TOKEN"),
        help="the admin token, when [admin] has token_sha256 (default: $GATEWAY_ADMIN_TOKEN)",
    )
    top.add_argument("--sort", choices=tuple(SORTS), default="out", help="sort key (default out)")
    top.add_argument("-n", "--limit", type=int, default=20, help="peers shown (default 20)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one view as plain text and exit")


class TopError(Exception):
    """The admin API cannot be read; ``str()`` says why."""


@dataclass
class Sample:
    """What the admin API said at one moment."""

    at: float
    stats: dict[str, Any]
    peers: dict[str, dict[str, Any]]


def fetch(admin: str, path: str, token: str | None) -> Any:
    request = urllib.request.Request(admin.rstrip("/") + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise TopError(f"{admin} needs the admin token: give --token") from None
        raise TopError(f"{admin}{path}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TopError(f"cannot read {admin}{path}: {reason}") from None


def sample(admin: str, token: str | None) -> Sample:
    stats = fetch(admin, "/stats", token)
    page = fetch(admin, "/peers?limit=10000", token)
    return Sample(time.monotonic(), stats, {peer["id"]: peer for peer in page["peers"]})


def _rate(now: float, before: float, seconds: float) -> float:
    return max(0.0, now - before) / seconds if seconds > 0 else 0.0


def render(old: Sample, new: Sample, sort: str, limit: int) -> list[str]:
    """The lines of one view: totals, then the ``limit`` busiest peers by ``sort``."""
    seconds = new.at - old.at
    stats, was = new.stats, old.stats
    received = _rate(stats["messages_received"], was["messages_received"], seconds)
    delivered = _rate(stats["messages_delivered"], was["messages_delivered"], seconds)
    dropped = sum(stats["dropped"].values())
    connections = "  ".join(f"{k} {v}" for k, v in stats["connections"].items()) or "none"
    lines = [
        f"gateway {stats['version']}  up {_age(stats['uptime_seconds'])}  peers {stats['peers']}"
        f"  channels {stats['channels']}  subscriptions {stats['subscriptions']}",
        f"connections: {connections}",
        f"messages: in {received:,.0f}/s  delivered {delivered:,.0f}/s  dropped {dropped:,} in all",
        "",
    ]
    now = time.time()
    rows = []
    for peer_id, peer in new.peers.items():
        before = old.peers.get(peer_id, peer)
        rows.append(
            {
                "id": peer_id,
                "transport": peer["transport"],
                "who": peer.get("user") or peer.get("tls_subject") or "",
                "address": peer["address"],
                "in": _rate(peer["messages_in"], before["messages_in"], seconds),
                "out": _rate(peer["messages_out"], before["messages_out"], seconds),
                "pending": peer["pending_bytes"],
                "age": now - peer["connected_since"],
            }
        )
    rows.sort(key=lambda row: row[sort], reverse=True)
    lines.append(
        f"{'PEER':<24} {'TRANSPORT':<9} {'USER':<12} {'ADDRESS':<22} {'IN/S':>9} {'OUT/S':>9}"
        f" {'PENDING':>9} {'AGE':>9}   sorted by {SORTS[sort]}"
    )
    for row in rows[:limit]:
        lines.append(
            f"{row['id'][:24]:<24} {row['transport']:<9} {row['who'][:12]:<12} "
            f"{row['address'][:22]:<22} {row['in']:>9,.0f} {row['out']:>9,.0f} "
            f"{row['pending']:>9,} {_age(row['age']):>9}"
        )
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more")
    return lines


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}"


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``gateway top``: the exit code (1 when the admin API cannot be read)."""
    try:
        first = sample(args.admin, args.token)
        if args.once:
            time.sleep(max(0.05, args.interval))
            print(
                "\n".join(render(first, sample(args.admin, args.token), args.sort, args.limit)),
                file=out,
            )
            return 0
        if not sys.stdin.isatty():
            print("gateway top: stdin is not a terminal; use --once", file=err)
            return 2
        return _live(args, first, out)
    except TopError as e:
        print(f"gateway top: {e}", file=err)
        return 1


def _live(args: argparse.Namespace, previous: Sample, out: TextIO) -> int:
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    sort = args.sort
    try:
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], args.interval)
            if ready:
                key = os.read(fd, 1).decode(errors="replace").lower()
                if key == "q":
                    return 0
                sort = KEYS.get(key, sort)
            current = sample(args.admin, args.token)
            view = render(previous, current, sort, args.limit)
            out.write("\x1b[H\x1b[2J" + "\n".join(view) + "\n  i o p a: sort   q: quit\n")
            out.flush()
            previous = current
    except KeyboardInterrupt:
        return 0
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
