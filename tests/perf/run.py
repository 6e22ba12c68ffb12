"""Side-by-side fan-out comparison: the gateway against what users would pick instead.

    .venv/bin/python -m tests.perf.run            # about 5 minutes on 2 cores
    .venv/bin/python -m tests.perf.run --quick    # one short run per server (a smoke check)

Every server runs pinned to CPU 0 and ``gateway bench`` (the load generator)
to CPU 1. Each scenario starts all of its servers, then runs the bench against
each in turn, three rounds in rotating order so that drift on the machine hits
every server alike, and keeps the median of each figure. Writes
``docs/benchmarks.md`` (tables, targets, the machine, how to reproduce, and
the figures as a JSON baseline that the next run compares itself with) and
``docs/images/benchmarks.png``.

Needs 2 CPUs, and ``nats-server`` (Debian package) on the PATH for a full run (with --only,
its runs are left out when it is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.perf.partial import merge_report
from tests.perf.plot import PLOT, write_plot
from tests.perf.report import DOC, machine, write_report
from tests.perf.rounds import figures, load_average, run_scenario
from tests.perf.scenarios import scenarios
from tests.perf.servers import ROOT, Ports, servers
from tests.perf.targets import checks


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gateway-perf-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short round, smaller scenarios")
    parser.add_argument(
        "--only",
        help="comma-separated scenario keys; their rows replace those in the existing doc",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 CPUs (server on one, load generator on the other)", file=sys.stderr)
        return 2
    nats = shutil.which("nats-server") is not None
    if not nats and not args.only:
        print("needs nats-server on the PATH: apt-get install nats-server", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = datetime.now(UTC)
    clock = time.monotonic()
    load_before = load_average()

    def log(text: str) -> None:
        print(text, flush=True)

    log(f"load average {load_before:.2f}; open files {hard}")
    table: dict[str, dict[str, Any]] = {}
    titles: dict[str, str] = {}
    with workdir() as work:
        ports = Ports()
        all_servers = servers(ports, work)
        # Make the dev certificates once, before any timing.
        all_servers["gateway"].start(work)
        all_servers["gateway"].stop()
        wanted = set(args.only.split(",")) if args.only else None
        for scenario in scenarios(ports, work, args.quick):
            if wanted is not None and scenario.key not in wanted:
                continue
            if not nats and "nats" in scenario.runs:
                del scenario.runs["nats"]
                log(f"{scenario.key}: no nats-server on the PATH, so no nats runs")
            log(f"{scenario.key}: {scenario.title} (load {load_average():.2f})")
            titles[scenario.key] = scenario.title
            results = run_scenario(scenario, all_servers, work, log)
            table[scenario.key] = {name: figures(runs) for name, runs in results.items()}
    elapsed = time.monotonic() - clock
    found = checks(table)
    for check in found:
        if check.scenario not in table:
            continue
        met = "-" if check.met is None else ("yes" if check.met else "NO")
        log(f"{check.scenario:9} {met:3} {check.target}: {check.measured} ({check.ratio})")
    if args.only and not args.no_write:
        merge_report(table, titles, started, elapsed, (load_before, load_average()), args.quick)
        log(f"merged {', '.join(table)} into {DOC.relative_to(ROOT)}")
    elif not args.no_write:
        write_report(
            table, titles, machine(), started, elapsed, (load_before, load_average()), args.quick
        )
        write_plot(table, titles)
        log(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
