"""The server under test, seen through ``/proc``: a process and its descendants (workers)."""

from __future__ import annotations

import contextlib
import os


class ServerProbe:
    """CPU time (all threads) and resident memory of a process and every process under it,
    so that a supervisor's ``--pid`` counts its workers too."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def processes(self) -> list[int]:
        """The process and its descendants, as they are now."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                with open(f"/proc/{entry}/stat") as f:
                    # pid (comm) state ppid ...: comm may hold spaces and parentheses.
                    ppid = int(f.read().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        found, queue = [], [self.pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            queue.extend(children.get(pid, ()))
        return found

    def cpu_ns(self) -> int:
        total = 0
        for pid in self.processes():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with (
                        contextlib.suppress(FileNotFoundError, ProcessLookupError),
                        open(f"/proc/{pid}/task/{task}/schedstat") as f,
                    ):
                        total += int(f.read().split()[0])
        return total

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.processes():
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"/proc/{pid}/status") as f,
            ):
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        return total
