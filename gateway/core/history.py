"""Channel history: the last messages of each channel that keeps some, numbered.

How many messages a channel keeps (and for how long: ``history_ttl``) comes
from functions of its name (the config's ``[channels.NAME]`` tables, patterns
included), asked once per channel and again after a reload (``resize``). A
channel that keeps nothing costs one dict entry; at most ``max_channels``
channels are remembered, and over that the ones keeping nothing are forgotten
first (then the oldest).

Each channel that keeps history has a ``ChannelLog``: its messages get offsets
1, 2, 3, ... and the log an **epoch**, a random string made when the log
starts. An offset names one message only together with its epoch: a log
starts again, with a new epoch and offsets from 1, whenever the history is
lost (the process restarts, the channel is forgotten under ``max_channels``,
a reload sizes it to 0).

Recording runs on every fan-out of such a channel, so it costs one tuple per
batch, never one per message: a batch is kept as one *run* (first offset,
sender, payloads, kinds, time), and the batch itself is stamped with its first
offset and the epoch for the JSON framers (offsets within a batch follow one
by one). This module is the memory store, and stays the numbering authority
and what recovery reads whatever the store: a durable store (``gateway.stores``)
is a ``Journal`` that persists what the logs record and gives the logs back
(``restore``) when the gateway starts again.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from gateway.core.interfaces import IPeer
from gateway.core.message import Batch, Kind, Origin

Run = tuple[int, Origin, Sequence[bytes], Sequence[Kind] | None, float]
"""One recorded batch: offset of its first message, sender, payloads, kinds, when."""


def _none(channel: str) -> int:
    return 0


def _forever(channel: str) -> float:
    return 0.0


def new_epoch() -> str:
    """A fresh epoch: 12 random URL-safe characters (72 bits: never the same twice)."""
    return secrets.token_urlsafe(9)


class Journal(Protocol):
    """Told of every change to the logs, in order, on the reactor thread (a durable store).

    Each call must return at once: persisting happens elsewhere, later."""

    def started(self, channel: str, log: ChannelLog) -> None:
        """``channel`` starts a new log: a new epoch, nothing kept yet."""

    def recorded(self, channel: str, log: ChannelLog, run: Run) -> None:
        """``log`` numbered and kept ``run`` (its messages, or the last ``log.size`` of them)."""

    def resized(self, channel: str, log: ChannelLog) -> None:
        """``log`` has a new ``size`` or ``ttl`` (a reload)."""

    def forgotten(self, channel: str) -> None:
        """``channel`` lost its history (sized to 0, or forgotten under ``max_channels``)."""


class ChannelLog:
    """The kept messages of one channel, as runs, and its numbering (``last``, ``epoch``)."""

    __slots__ = ("_held", "epoch", "last", "runs", "size", "ttl")

    def __init__(self, size: int, ttl: float, epoch: str) -> None:
        self.size = size  # at most this many messages are kept
        self.ttl = ttl  # seconds a message is kept; 0: no limit
        self.epoch = epoch
        self.last = 0  # the offset of the last message given one; 0: none yet
        self.runs: deque[Run] = deque()
        # Messages in ``runs``: the first run may begin with some no longer kept.
        self._held = 0

    @property
    def kept(self) -> int:
        """How many messages are kept: offsets ``last - kept + 1`` to ``last``."""
        return min(self._held, self.size)

    @classmethod
    def restored(
        cls, size: int, ttl: float, epoch: str, last: int, runs: Iterable[Run], now: float
    ) -> ChannelLog:
        """A log as a store kept it: ``runs`` oldest first, one after another, the last
        ending at offset ``last``; then trimmed to ``size`` and ``ttl``."""
        log = cls(size, ttl, epoch)
        log.last = last
        log.runs.extend(runs)
        log._held = sum(len(run[2]) for run in log.runs)
        log.resize(size, ttl)
        if ttl:
            log.expire(now)
        return log

    def record(self, batch: Batch, now: float) -> Run | None:
        """Number ``batch`` (stamping it) and keep it, forgetting what no longer fits;
        the run kept (None for an empty batch)."""
        payloads = batch.payloads
        count = len(payloads)
        if not count:
            return None
        first = self.last + 1
        batch.offset = first
        batch.epoch = self.epoch
        self.last += count
        kinds = batch.kinds
        size = self.size
        if count > size:  # only its last ``size`` messages can be kept
            cut = count - size
            payloads = payloads[cut:]
            kinds = kinds[cut:] if kinds is not None else None
            first += cut
            count = size
        runs = self.runs
        run = (first, batch.origin, payloads, kinds, now)
        runs.append(run)
        held = self._held + count
        while held - len(runs[0][2]) >= size:
            held -= len(runs.popleft()[2])
        self._held = held
        dead = held - size
        if dead > 0 and 2 * dead >= len(runs[0][2]):
            self._drop_dead()
        if self.ttl:
            self.expire(now)
        return run

    def _drop_dead(self) -> None:
        """Let go of the first run's messages that are no longer kept (done once half of
        it is, so that a long run is not copied for every message after it)."""
        dead = self._held - self.size
        if dead <= 0:
            return
        first, origin, payloads, kinds, at = self.runs[0]
        kinds = kinds[dead:] if kinds is not None else None
        self.runs[0] = (first + dead, origin, payloads[dead:], kinds, at)
        self._held = self.size

    def expire(self, now: float) -> None:
        """Forget the messages ``ttl`` seconds old or older (a run's messages share a time)."""
        runs = self.runs
        limit = now - self.ttl
        while runs and runs[0][4] <= limit:
            self._held -= len(runs.popleft()[2])

    def resize(self, size: int, ttl: float) -> None:
        """New settings (a reload): what still fits is kept, with its offsets and epoch."""
        self._drop_dead()
        self.size = size
        self.ttl = ttl
        runs = self.runs
        while runs and self._held - len(runs[0][2]) >= size:
            self._held -= len(runs.popleft()[2])
        self._drop_dead()

    def after(self, offset: int, channel: str, recovered: bool) -> list[Batch]:
        """The kept messages after ``offset``, oldest first, as batches (one per run):
        marked ``recovered``, or else ``history`` (a plain replay)."""
        start = max(offset + 1, self.last - self.kept + 1)
        pieces = []
        for first, origin, payloads, kinds, _ in reversed(self.runs):
            if first + len(payloads) <= start:
                break
            skip = max(0, start - first)
            pieces.append(
                Batch(
                    origin,
                    channel,
                    payloads[skip:] if skip else payloads,
                    kinds[skip:] if skip and kinds is not None else kinds,
                    history=not recovered,
                    offset=first + skip,
                    epoch=self.epoch,
                    recovered=recovered,
                )
            )
        pieces.reverse()
        return pieces


_UNKNOWN = ChannelLog(0, 0.0, "")  # not asked about yet (None: keeps no history)


class History:
    """The ``ChannelLog`` of every channel that keeps history (the memory store)."""

    def __init__(
        self,
        size_of: Callable[[str], int] = _none,
        max_channels: int = 100_000,
        ttl_of: Callable[[str], float] = _forever,
        clock: IReactorTime | None = None,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        self.size_of = size_of
        self.ttl_of = ttl_of
        self.max_channels = max_channels
        self.clock = clock  # for ``history_ttl``; without one, messages never expire
        self.epochs = epochs
        self._kept: dict[str, ChannelLog | None] = {}
        # A durable store, told of every change (None: the memory store alone).
        self.journal: Journal | None = None
        # False when a cluster's archive numbers the batches (``[history] store = "redis"``):
        # the logs then only tell which channels keep history, and how much.
        self.numbering = True

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    def _start(self, channel: str) -> ChannelLog | None:
        size = self.size_of(channel)
        if size <= 0:
            return None
        log = ChannelLog(size, self.ttl_of(channel), self.epochs())
        if self.journal is not None:
            self.journal.started(channel, log)
        return log

    def _forget(self, channel: str) -> None:
        """``channel``'s log (if it has one) is no longer kept."""
        if self._kept.pop(channel, None) is not None and self.journal is not None:
            self.journal.forgotten(channel)

    def of(self, channel: str) -> ChannelLog | None:
        """The log of ``channel``, or None when it keeps no history."""
        log = self._kept.get(channel, _UNKNOWN)
        if log is _UNKNOWN:
            log = self._start(channel)
            if len(self._kept) >= self.max_channels:
                self._make_room()
            self._kept[channel] = log
        return log

    def known(self, channel: str) -> ChannelLog | None:
        """The log of ``channel`` if it has one now (never starts one)."""
        return self._kept.get(channel)

    def restore(self, channel: str, epoch: str, last: int, runs: Iterable[Run]) -> bool:
        """Give ``channel`` back the log a store kept (at start), trimmed to today's
        settings; False when it keeps no history now."""
        size = self.size_of(channel)
        if size <= 0:
            return False
        if channel not in self._kept and len(self._kept) >= self.max_channels:
            self._make_room()
        log = ChannelLog.restored(size, self.ttl_of(channel), epoch, last, runs, self._now())
        self._kept[channel] = log
        return True

    def _make_room(self) -> None:
        empty = [name for name, log in self._kept.items() if log is None]
        for name in empty:
            del self._kept[name]
        if len(self._kept) >= self.max_channels:
            self._forget(next(iter(self._kept)))

    def _fresh(self, channel: str) -> ChannelLog | None:
        """The log of ``channel`` with what ``history_ttl`` forgets forgotten."""
        log = self.of(channel)
        if log is not None and log.ttl:
            log.expire(self._now())
        return log

    def record(self, batch: Batch) -> None:
        """Number and remember ``batch`` if its channel keeps history."""
        if not self.numbering:
            return
        log = self._kept.get(batch.channel, _UNKNOWN)
        if log is _UNKNOWN:
            log = self.of(batch.channel)
        if log is not None:
            run = log.record(batch, self._now())
            journal = self.journal
            if journal is not None and run is not None:
                journal.recorded(batch.channel, log, run)

    def position(self, channel: str) -> tuple[int, str] | None:
        """``(offset of the last message, epoch)`` of a channel name, or None when it
        keeps no history."""
        log = self.of(channel)
        return None if log is None else (log.last, log.epoch)

    def replay(self, channel: str) -> list[Batch]:
        """The kept messages of ``channel``, oldest first, marked ``history``."""
        log = self._fresh(channel)
        return [] if log is None else log.after(0, channel, recovered=False)

    def since(self, channel: str, offset: int, epoch: str) -> list[Batch] | None:
        """Every message of ``channel`` after ``offset`` of ``epoch``, marked
        ``recovered`` (none when ``offset`` is the last), or None when that cannot be
        told: another epoch, an offset never given, or messages after it forgotten."""
        log = self._fresh(channel)
        if log is None or epoch != log.epoch or offset > log.last:
            return None
        if offset < log.last - log.kept:
            return None  # a gap: some messages after ``offset`` are no longer kept
        return log.after(offset, channel, recovered=True)

    def resize(
        self,
        size_of: Callable[[str], int] | None = None,
        ttl_of: Callable[[str], float] | None = None,
    ) -> None:
        """Settings changed (a reload): keep what still fits; a channel that keeps
        nothing now loses its history (and will start a new epoch)."""
        if size_of is not None:
            self.size_of = size_of
        if ttl_of is not None:
            self.ttl_of = ttl_of
        journal = self.journal
        for channel, log in list(self._kept.items()):
            size = self.size_of(channel)
            if size <= 0:
                self._kept[channel] = None
                if log is not None and journal is not None:
                    journal.forgotten(channel)
            elif log is None:
                self._kept[channel] = self._start(channel)
            else:
                ttl = self.ttl_of(channel)
                if (size, ttl) != (log.size, log.ttl):
                    log.resize(size, ttl)
                    if journal is not None:
                        journal.resized(channel, log)


def may_replay(peer: IPeer, channel: str) -> bool:
    """Whether ``peer`` may be sent the history of ``channel``: it may subscribe to it
    and receive it."""
    permissions = peer.permissions
    return permissions is None or (
        permissions.may_subscribe(channel) and permissions.may_receive(channel)
    )


def deliver_all(peer: IPeer, batches: Iterable[Batch]) -> int:
    """Frame each batch for ``peer`` and deliver it; returns how many messages went."""
    framer = peer.framer
    sent = 0
    for batch in batches:
        wire = framer.frame(batch)
        if wire is not None:
            peer.deliver(wire)
            sent += len(batch)
    return sent
