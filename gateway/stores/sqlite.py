"""The file of ``[history] store = "sqlite:PATH"``: its tables, read back and written.

Everything here blocks: it runs only on the store's own thread
(``gateway.stores.durable``), never on the reactor thread.

Three tables:

- ``meta``: ``schema`` (1) and ``clean``: "1" once a gateway stopped after writing
  everything it had numbered, "0" while one runs. A file that was not left clean
  (the process was killed, the last write failed) may lack the last messages given
  out, so each channel continues with a **new epoch** (its kept messages stay, for
  plain replays): a client is told ``recovered:false`` rather than given offsets
  that might name other messages.
- ``channels``: each channel that keeps history: its ``epoch`` and the offset of its
  ``last`` message.
- ``runs``: one row per recorded batch of one channel: its epoch, first and last
  offset, sender, time, and messages (their lengths, their bytes joined, their kinds
  when typed). A channel's rows are trimmed to its ``history`` size and
  ``history_ttl`` on every write (one row per channel the settings let go of may
  stay: it straddles the window).

One table of runs keyed by channel rather than a table per channel: up to
``max_channels`` (100,000) channels are remembered, far more than sqlite's schema
is made for.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.history import Run
from gateway.core.message import Kind, Origin

SCHEMA = "1"

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS channels"
    " (name TEXT PRIMARY KEY, epoch TEXT NOT NULL, last INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS runs (channel TEXT NOT NULL, last INTEGER NOT NULL,"
    " first INTEGER NOT NULL, epoch TEXT NOT NULL, peer TEXT NOT NULL, listener TEXT NOT NULL,"
    " transport TEXT NOT NULL, user TEXT, at REAL NOT NULL, kinds BLOB, lengths BLOB NOT NULL,"
    " data BLOB NOT NULL, PRIMARY KEY (channel, last))",
)
_INSERT_RUN = "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_CHANNEL = (
    "INSERT INTO channels (name, epoch, last) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, last = excluded.last"
)
_KIND_CODES = {Kind.TEXT: 0, Kind.BINARY: 1}

Position = tuple[str, int, int, float, bool] | None
"""What a write makes of one channel: (epoch, last offset, size, ttl, whether the epoch
is new), or None when the channel keeps no history any more."""

Pending = tuple[str, str, Run]
"""A run waiting to be written: (channel, epoch, run)."""


class HistoryFileError(Exception):
    """The file cannot be opened, read or written; ``str()`` says why."""


@dataclass
class StoredLog:
    """One channel's log as the file had it: ``runs`` oldest first, one after another,
    the last ending at ``last`` (those after a gap are all that is kept)."""

    channel: str
    epoch: str
    last: int
    runs: list[Run] = field(default_factory=list)


@dataclass
class Loaded:
    """What ``open`` read: the logs, and whether the last gateway left the file clean."""

    logs: list[StoredLog]
    clean: bool


class HistoryFile:
    """The sqlite file at ``path``: ``open``, then ``write`` as often as needed, ``close``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None

    def open(self, size_of: Callable[[str], int], new_epoch: Callable[[], str]) -> Loaded:
        """Open (or create) the file, read every channel's log back (the last ``size_of``
        messages of each), and mark the file in use."""
        if not self.path.parent.is_dir():
            raise HistoryFileError(f"cannot open {self.path}: no folder {self.path.parent}")
        try:
            # Only the store's one thread uses it, but not always the thread that opened it
            # (tests run it inline).
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise HistoryFileError(f"cannot open {self.path}: {e}") from None
        try:
            db.execute("PRAGMA busy_timeout = 1000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit survives a crash
            db.execute("BEGIN IMMEDIATE")
            for table in _TABLES:
                db.execute(table)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            schema = meta.get("schema", SCHEMA)
            if schema != SCHEMA:
                raise HistoryFileError(
                    f"{self.path} has history schema {schema}; this gateway reads {SCHEMA}"
                )
            clean = meta.get("clean", "1") == "1"
            logs = _read(db, size_of, None if clean else new_epoch)
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [("schema", SCHEMA), ("clean", "0")]
            )
            db.execute("COMMIT")
            stat = os.stat(self.path)
        except (sqlite3.Error, OSError, HistoryFileError) as e:
            db.close()
            if isinstance(e, HistoryFileError):
                raise
            raise HistoryFileError(f"cannot use {self.path}: {e}") from None
        self.connection = db
        self._identity = (stat.st_dev, stat.st_ino)
        return Loaded(logs, clean)

    def write(
        self,
        runs: Sequence[Pending],
        positions: Mapping[str, Position],
        now: float,
        clean: bool = False,
    ) -> None:
        """One transaction: ``runs`` (see ``still_kept``), each channel's position,
        trimmed to its size and ttl; ``clean`` marks the file left clean (the last write
        of a gateway that stops)."""
        db = self.connection
        if db is None:
            raise HistoryFileError(f"{self.path} is not open")
        self._check_file()
        try:
            db.execute("BEGIN IMMEDIATE")
            for name, position in positions.items():
                if position is None:
                    db.execute("DELETE FROM runs WHERE channel = ?", (name,))
                    db.execute("DELETE FROM channels WHERE name = ?", (name,))
                elif position[4]:  # a new epoch: what the old one kept goes
                    db.execute(
                        "DELETE FROM runs WHERE channel = ? AND epoch != ?", (name, position[0])
                    )
            db.executemany(_INSERT_RUN, [_row(*pending) for pending in runs])
            for name, position in positions.items():
                if position is None:
                    continue
                epoch, last, size, ttl, _ = position
                db.execute(_UPSERT_CHANNEL, (name, epoch, last))
                db.execute("DELETE FROM runs WHERE channel = ? AND last <= ?", (name, last - size))
                if ttl:
                    db.execute("DELETE FROM runs WHERE channel = ? AND at <= ?", (name, now - ttl))
            if clean:
                db.execute("UPDATE meta SET value = '1' WHERE key = 'clean'")
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection rolls back what it cannot finish
            raise HistoryFileError(str(e)) from None

    def _check_file(self) -> None:
        """A file removed (or replaced) under the gateway would be written in vain: what
        was written goes with it, and a restart would start afresh."""
        try:
            stat = os.stat(self.path)
        except OSError as e:
            raise HistoryFileError(f"{self.path}: {e.strerror or e}") from None
        if (stat.st_dev, stat.st_ino) != self._identity:
            raise HistoryFileError(f"{self.path} was replaced by another file")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def still_kept(runs: Sequence[Pending], positions: Mapping[str, Position]) -> list[Pending]:
    """The runs of ``runs`` that their channel still keeps at ``positions``: of its epoch,
    and within its last ``size`` messages. A busy channel records far more between two
    writes than its history holds: the rest need not be written at all."""
    return [
        pending
        for pending in runs
        if (position := positions.get(pending[0])) is not None
        and position[0] == pending[1]
        and pending[2][0] + len(pending[2][2]) - 1 > position[1] - position[2]
    ]


def _read(
    db: sqlite3.Connection, size_of: Callable[[str], int], new_epoch: Callable[[], str] | None
) -> list[StoredLog]:
    """Every channel's log; a channel that keeps no history now is deleted; with
    ``new_epoch`` (the file was not left clean) each log continues with a new epoch."""
    logs = []
    origins: dict[tuple[Any, ...], Origin] = {}
    db.execute("DELETE FROM runs WHERE channel NOT IN (SELECT name FROM channels)")
    for name, epoch, last in db.execute("SELECT name, epoch, last FROM channels").fetchall():
        size = size_of(name)
        if size <= 0:
            db.execute("DELETE FROM runs WHERE channel = ?", (name,))
            db.execute("DELETE FROM channels WHERE name = ?", (name,))
            continue
        db.execute("DELETE FROM runs WHERE channel = ? AND epoch != ?", (name, epoch))
        rows = db.execute(
            "SELECT first, last, peer, listener, transport, user, at, kinds, lengths, data"
            " FROM runs WHERE channel = ? AND epoch = ? AND last > ? ORDER BY last",
            (name, epoch, last - size),
        ).fetchall()
        log = StoredLog(name, epoch, last, _contiguous(rows, last, origins))
        if new_epoch is not None:
            log.epoch = new_epoch()
            db.execute("UPDATE channels SET epoch = ? WHERE name = ?", (log.epoch, name))
            db.execute(
                "UPDATE runs SET epoch = ? WHERE channel = ? AND epoch = ?",
                (log.epoch, name, epoch),
            )
        logs.append(log)
    return logs


def _contiguous(rows: list[Any], last: int, origins: dict[tuple[Any, ...], Origin]) -> list[Run]:
    """The runs of ``rows`` (oldest first) that end at ``last`` with no gap between them:
    a run that was never written (a failed write) cuts off everything before it."""
    runs: list[Run] = []
    expected = last
    for row in reversed(rows):
        run = _run(row, origins)
        if run is None or row[1] != expected:
            break
        runs.append(run)
        expected = run[0] - 1
    runs.reverse()
    return runs


def _row(channel: str, epoch: str, run: Run) -> tuple[Any, ...]:
    first, origin, payloads, kinds, at = run
    count = len(payloads)
    return (
        channel,
        first + count - 1,
        first,
        epoch,
        origin.peer_id,
        origin.listener,
        origin.transport,
        origin.user,
        at,
        None if kinds is None else bytes(map(_KIND_CODES.__getitem__, kinds)),
        struct.pack(f"<{count}I", *map(len, payloads)),
        b"".join(payloads),
    )


def _run(row: Sequence[Any], origins: dict[tuple[Any, ...], Origin]) -> Run | None:
    """A run from its row; None when the row does not hold what it says."""
    first, last, peer, listener, transport, user, at, kinds, lengths, data = row
    count = last - first + 1
    if count < 1 or len(lengths) != 4 * count or (kinds is not None and len(kinds) != count):
        return None
    payloads = []
    start = 0
    for length in struct.unpack(f"<{count}I", lengths):
        payloads.append(data[start : start + length])
        start += length
    if start != len(data):
        return None
    key = (peer, listener, transport, user)
    origin = origins.get(key)
    if origin is None:
        origin = origins[key] = Origin(peer, listener, transport, user)
    typed = None if kinds is None else [Kind.BINARY if code else Kind.TEXT for code in kinds]
    return (first, origin, payloads, typed, at)
