"""The server under test, seen through ``/proc``."""

from __future__ import annotations

import contextlib
import os


class ServerProbe:
    """CPU time (all threads) and resident memory of a process, from ``/proc``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_ns(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with (
                    contextlib.suppress(FileNotFoundError, ProcessLookupError),
                    open(f"/proc/{self.pid}/task/{task}/schedstat") as f,
                ):
                    total += int(f.read().split()[0])
        return total

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0
