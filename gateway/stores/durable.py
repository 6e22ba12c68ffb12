"""History that outlives the process: the memory logs, persisted to an sqlite file.

``DurableHistory`` is the ``Journal`` of the bus's ``History``
(``gateway.core.history``), which stays the numbering authority and what recovery
reads: recovery is as exact, and as synchronous, as with the memory store. What the
logs record is written to the file (``gateway.stores.sqlite``) on a thread of the
store's own, never on the reactor thread:

- **batched**: what is recorded in ``FLUSH_SECONDS`` (every reactor turn of them)
  becomes one transaction, and what is recorded while one is being written waits for
  the next; only what each channel still keeps is written (a busy channel records far
  more in that time than its ``history`` holds);
- **bounded**: at most ``MAX_UNWRITTEN_BYTES`` of messages wait to be written; past
  that, what the channels no longer keep is let go of, then runs are left out of the
  file (counted in ``unwritten``, logged at most once a minute) — never out of memory
  or live delivery;
- **failing softly**: a write that fails (disk full, the file removed) sets
  ``problem`` (``/healthz`` reports the store unhealthy), its runs are counted in
  ``unwritten`` and the failure is logged (once, then at most once a minute); live
  delivery and recovery from memory go on, and a write is tried again a second later.
  Each channel's position (epoch, last offset) is always written again, so a restart
  never gives out an offset twice; what is missing only shortens what a restart can
  recover.

``open`` reads every channel's log back before the gateway listens, so that after a
restart each channel continues with the same epoch and offsets; ``close`` writes what
is left and marks the file clean (``HistoryFile``: a file not left clean continues
with new epochs).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from gateway.core.history import ChannelLog, History, Run
from gateway.flow.ratelog import RateLimitedLog
from gateway.stores.sqlite import (
    HistoryFile,
    HistoryFileError,
    Loaded,
    Pending,
    Position,
    still_kept,
)

MAX_UNWRITTEN_BYTES = 64 * 1024 * 1024
"""Message bytes recorded and not yet written (queued or being written) at most."""

FLUSH_SECONDS = 0.1
"""What is recorded waits this long for the next write: one transaction for every turn of
the reactor in that time (a crash may lose it from the file, but a file not left clean
continues with new epochs, so no offset is ever recovered wrongly)."""

RETRY_SECONDS = 1.0
"""After a failed write, the next one waits this long (no busy loop on a full disk)."""

Work = Callable[[], Any]
Runner = Callable[[Work], "Deferred[Any]"]
"""Runs blocking work somewhere and fires with its result (or fails with its exception)."""


def thread_runner(reactor: Any, pool: ThreadPool) -> Runner:
    """Work runs in ``pool`` (one thread: the file's writes are in order), results come
    back on the reactor thread (``reactor`` provides ``IReactorFromThreads``)."""

    def run(work: Work) -> Deferred[Any]:
        done: Deferred[Any] = deferToThreadPool(reactor, pool, work)
        return done

    return run


def inline_runner() -> Runner:
    """Work runs at once on the calling thread: for tests on a memory reactor only."""

    def run(work: Work) -> Deferred[Any]:
        try:
            return succeed(work())
        except Exception:
            return fail()

    return run


class DurableHistory:
    """The sqlite store of one gateway: the ``Journal`` of ``history``.

    ``reactor`` is the clock (``callLater``, ``seconds``) and, without ``run``, where
    the results of a thread pool of one thread come back; tests pass ``inline_runner``.
    """

    kind = "sqlite"
    log = Logger(namespace="gateway.history")

    def __init__(
        self,
        path: Path,
        history: History,
        reactor: Any,
        run: Runner | None = None,
        max_unwritten_bytes: int = MAX_UNWRITTEN_BYTES,
    ) -> None:
        self.path = path
        self.history = history
        self.reactor = reactor
        self.file = HistoryFile(path)
        self.max_unwritten_bytes = max_unwritten_bytes
        self._pool: ThreadPool | None = None
        if run is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="gateway-history")
            run = thread_runner(reactor, self._pool)
        self._run = run
        self._ratelog = RateLimitedLog(self.log, reactor, interval=60.0)
        # Waiting for the next write: runs in the order recorded, and the channels whose
        # position changed (True: a new epoch, whose old rows go).
        self._runs: list[Pending] = []
        self._dirty: dict[str, bool] = {}
        self._waiting_bytes = 0  # message bytes of ``_runs``
        self._writing_bytes = 0  # and of the runs being written
        self._flushing: IDelayedCall | None = None
        self._writing: Deferred[None] | None = None
        self._open = False
        self._closing = False
        self.problem: str | None = None
        """Why the last write failed (the store is unhealthy); None while writes succeed."""
        self.unwritten = 0
        """Messages recorded that never reached the file (left out, or a failed write)."""

    def describe(self) -> str:
        return f"{self.kind} {self.path}"

    # Start and stop

    async def open(self) -> None:
        """Read the file back into the logs (before anyone is served); then journal.

        Before the reactor runs (``twistd`` binds ports in ``privilegedStartService``,
        before it drops privileges) the file is read at once: nothing waits on the reactor
        yet, and the ports need not wait for it. Raises ``HistoryFileError`` when the file
        cannot be used."""
        if self._pool is not None:
            self._pool.start()
        history = self.history
        run = self._run if getattr(self.reactor, "running", True) else inline_runner()
        try:
            loaded: Loaded = await run(partial(self.file.open, history.size_of, history.epochs))
        except Exception:
            self._stop_pool()
            raise
        messages = 0
        for stored in loaded.logs:
            if history.restore(stored.channel, stored.epoch, stored.last, stored.runs):
                messages += sum(len(run[2]) for run in stored.runs)
            self._dirty[stored.channel] = False  # trimmed to today's settings, or deleted
        history.journal = self
        self._open = True
        self.log.info(
            "history: {channels} channels, {messages} messages read back from {path}",
            channels=len(loaded.logs),
            messages=messages,
            path=str(self.path),
        )
        if not loaded.clean:
            self.log.warn(
                "history: {path} was not left clean (the gateway was killed, or its last write "
                "failed): every channel continues with a new epoch, so clients recover with "
                "recovered:false",
                path=str(self.path),
            )
        if self._dirty:
            self._soon()

    async def close(self) -> None:
        """Write what is left, mark the file clean (when that write succeeds), close it.

        Called once the peers are gone: what is numbered after the last write began
        (by an application's own peer, say) reached nobody outside the process."""
        if self._closing:
            return
        self._closing = True  # no more writes on the clock: the last one takes everything
        if self._open:
            if self._flushing is not None and self._flushing.active():
                self._flushing.cancel()
            self._flushing = None
            while self._writing is not None:
                await self._writing
            if self.history.journal is self:
                self.history.journal = None
            await self._flush(final=True)
            try:
                await self._run(self.file.close)
            except Exception:
                self.log.failure("history: closing {path}", path=str(self.path))
        self._stop_pool()

    def _stop_pool(self) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()

    # The Journal of the memory logs (reactor thread; each returns at once)

    def started(self, channel: str, log: ChannelLog) -> None:
        self._dirty[channel] = True
        self._soon()

    def recorded(self, channel: str, log: ChannelLog, run: Run) -> None:
        payloads = run[2]
        size = sum(map(len, payloads))
        if self._waiting_bytes + self._writing_bytes + size > self.max_unwritten_bytes:
            self._compact()
        if self._waiting_bytes + self._writing_bytes + size > self.max_unwritten_bytes:
            self.unwritten += len(payloads)
            self._ratelog.emit(
                "behind",
                "history: {path} is behind by over {limit} bytes: messages of {channel} are "
                "not written (kept in memory and delivered all the same)",
                path=str(self.path),
                limit=self.max_unwritten_bytes,
                channel=channel,
            )
        else:
            self._runs.append((channel, log.epoch, run))
            self._waiting_bytes += size
        if channel not in self._dirty:
            self._dirty[channel] = False
        self._soon()

    def resized(self, channel: str, log: ChannelLog) -> None:
        self._dirty.setdefault(channel, False)
        self._soon()

    def forgotten(self, channel: str) -> None:
        self._dirty.setdefault(channel, False)
        self._soon()

    # Writing

    def _soon(self) -> None:
        if self._flushing is None and self._writing is None and self._open and not self._closing:
            delay = FLUSH_SECONDS if self.problem is None else RETRY_SECONDS
            self._flushing = self.reactor.callLater(delay, self._flush)

    def _position(self, channel: str, fresh: bool) -> Position:
        log = self.history.known(channel)
        return None if log is None else (log.epoch, log.last, log.size, log.ttl, fresh)

    def _compact(self) -> None:
        """Let go of the waiting runs their channels no longer keep (the file is behind)."""
        positions = {name: self._position(name, False) for name, _, _ in self._runs}
        self._runs = still_kept(self._runs, positions)
        self._waiting_bytes = sum(sum(map(len, run[2])) for _, _, run in self._runs)

    def _flush(self, final: bool = False) -> Deferred[None]:
        self._flushing = None
        dirty, self._dirty = self._dirty, {}
        positions = {name: self._position(name, fresh) for name, fresh in dirty.items()}
        runs = still_kept(self._runs, positions)
        self._runs = []
        self._waiting_bytes = 0
        self._writing_bytes = sum(sum(map(len, run[2])) for _, _, run in runs)
        write = partial(self.file.write, runs, positions, self.reactor.seconds(), final)
        try:
            done = self._run(write)
        except Exception:
            done = fail()
        done.addCallbacks(self._written, self._failed, errbackArgs=(runs, dirty))
        writing: Deferred[None] = done.addBoth(self._finished)
        if not writing.called:
            self._writing = writing
        return writing

    def _written(self, result: object) -> None:
        if self.problem is not None:
            self.log.info("history: writing {path} again", path=str(self.path))
            self.problem = None

    def _failed(self, failure: Failure, runs: list[Pending], dirty: dict[str, bool]) -> None:
        error = failure.value
        reason = str(error) if isinstance(error, HistoryFileError) else repr(error)
        self.unwritten += sum(len(run[2]) for _, _, run in runs)
        if self.problem is None:
            self.log.error(
                "history: cannot write {path}: {reason}; live delivery goes on, what a restart "
                "can recover is shorter (trying again every {retry:g} s)",
                path=str(self.path),
                reason=reason,
                retry=RETRY_SECONDS,
            )
        else:
            self._ratelog.emit(
                "failing",
                "history: still cannot write {path}: {reason}",
                path=str(self.path),
                reason=reason,
            )
        self.problem = reason
        # The positions are written again: a restart must continue after the last offset.
        for name, fresh in dirty.items():
            self._dirty[name] = fresh or self._dirty.get(name, False)

    def _finished(self, result: object) -> None:
        self._writing_bytes = 0
        self._writing = None
        if self._runs or self._dirty:
            self._soon()
