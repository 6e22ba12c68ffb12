"""The clock of ``gateway bench``: every time is an integer of nanoseconds."""

from __future__ import annotations

import time

now_ns = time.monotonic_ns
"""The send and receive clock: CLOCK_MONOTONIC, the same in every process of a machine."""
SECOND = 1_000_000_000
