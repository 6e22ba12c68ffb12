"""History in Redis Streams (``[history] store = "redis"``): offsets that agree cluster-wide.

Redis numbers the batches of every channel that keeps history, so each node
must see them in Redis's order. A local batch on such a channel is therefore not
fanned out at once: ``sequence`` runs ``SEQUENCE`` (one round trip per batch),
which numbers it, keeps each message in the channel's stream and publishes it;
every node, this one included, delivers it when the publication arrives on its
subscribed connection, in offset order (a node skips its own sender unless it
asked for echo). The batches of one sender stay in order: one connection, one
script after the other.

What a joining or recovering peer is owed (``recall``) is read by ``RECALL``,
whose answer is *published* to this node's own Redis channel
(``<prefix>:~history:<node>``): it arrives on the subscribed connection in order
with the channel's messages, the peer's subscription begins in that same step,
and so every message comes exactly once — from the answer if it was numbered
before it, live if after. The node subscribes to the channel (and waits for
Redis to confirm) before asking, so nothing numbered after the answer is missed.

Redis unreachable: live delivery goes on, unnumbered (``sequence`` answers
False and the bus delivers locally, as for any channel), recoveries answer
``recovered:false``, and once Redis is back each channel that went unnumbered
here gets a new epoch first (``RENEW``), so no client recovers across messages
that were never kept. Batches awaiting Redis when it went are delivered here
unnumbered unless their publication already was, and their channels renewed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import txredisapi
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.cluster.redis import Link, describe_failure
from gateway.cluster.scripts import (
    RECALL,
    RENEW,
    SEQUENCE,
    owed,
    parse_numbered,
    parse_recalled,
    sha1,
)
from gateway.cluster.wire import (
    WireError,
    decode,
    encode_batch,
    remote_origin,
)
from gateway.core.archive import Recall
from gateway.core.history import ChannelLog, History, new_epoch
from gateway.core.interfaces import IPeer
from gateway.core.message import Batch

if TYPE_CHECKING:
    from gateway.cluster.backplane import Backplane

_SHAS = {"SEQUENCE": sha1(SEQUENCE), "RECALL": sha1(RECALL), "RENEW": sha1(RENEW)}

RECALL_TIMEOUT = 5.0
"""Seconds a recall waits for Redis; then the peer starts with ``recovered:false``."""

MAX_RECALLS = 1024
"""Recalls waiting for Redis at once, at most; more are answered ``recovered:false`` at
once (clients that subscribe over and over cannot make Redis work without bound)."""


@dataclass
class _InFlight:
    """A local batch sent to ``SEQUENCE`` and not yet acknowledged."""

    sender: IPeer
    batch: Batch
    size: int
    delivered: bool = False  # its publication came back and was delivered here


@dataclass
class _Asked:
    """A recall waiting for its answer."""

    channel: str
    since: tuple[int, str] | None
    log: ChannelLog
    done: Deferred[Recall] = field(default_factory=Deferred)
    timer: IDelayedCall | None = None
    sent: bool = False


class RedisArchive:
    """The ``Archive`` of the bus and the ``Journal`` of its ``History`` in a cluster."""

    log = Logger()

    def __init__(self, backplane: Backplane, history: History) -> None:
        self.backplane = backplane
        self.bus = backplane.bus
        self.history = history
        history.numbering = False
        history.journal = self
        self.node = backplane.node
        prefix = backplane.settings.prefix
        self.prefix = prefix
        self.own_key = f"{prefix}:~history:{backplane.node}".encode()
        self.max_pending_bytes = backplane.max_pending_bytes
        self.ready = False  # scripts loaded, own channel subscribed, renewals sent
        self._seqs = itertools.count(1)
        self._inflight: dict[int, _InFlight] = {}
        self._pending_bytes = 0
        self._requests = itertools.count(1)
        self._asked: dict[int, _Asked] = {}
        # Channels whose messages went out unnumbered here: a new epoch before the next.
        self._unnumbered: set[str] = set()
        self._keys: dict[str, tuple[bytes, bytes, bytes]] = {}
        # Counters
        self.sequenced = 0
        self.overflowed = 0
        self.recalls = 0
        self.failed_recalls = 0

    # Keys

    def _keys_of(self, channel: str) -> tuple[bytes, bytes, bytes]:
        """(position hash, stream, Redis channel) of a gateway channel."""
        keys = self._keys.get(channel)
        if keys is None:
            if len(self._keys) >= self.history.max_channels:
                self._keys.clear()
            base = f"{self.prefix}:{channel}"
            keys = (f"{base}:~position".encode(), f"{base}:~stream".encode(), base.encode())
            self._keys[channel] = keys
        return keys

    # The bus (``gateway.core.archive.Archive``)

    def keeps(self, channel: str) -> bool:
        return self.history.of(channel) is not None

    def sequence(self, sender: IPeer, batch: Batch) -> bool:
        log = self.history.of(batch.channel)
        if log is None:
            return False
        link = self.backplane.link
        if link is None or not self.ready:
            self._went_unnumbered(batch.channel)
            return False
        count = len(batch.payloads)
        size = batch.byte_count()
        if self._pending_bytes + size > self.max_pending_bytes:
            self.overflowed += count
            self.bus.metrics.drop("history_overflow", count)
            return True
        clock = self.bus.clock
        seq = next(self._seqs)
        sent = self._run(
            link,
            "SEQUENCE",
            batch.channel,
            self._keys_of(batch.channel)[2],
            self.own_key,
            new_epoch(),
            log.size,
            int(log.ttl * 1000),
            seq,
            encode_batch(self.node, batch),
            count,
            repr(clock.seconds() if clock is not None else 0.0),
        )
        if sent is None:
            self._went_unnumbered(batch.channel)
            return False
        self._inflight[seq] = _InFlight(sender, batch, size)
        self._pending_bytes += size
        self.sequenced += count
        return True

    def recall(self, channel: str, since: tuple[int, str] | None) -> Deferred[Recall]:
        log = self.history.of(channel)
        link = self.backplane.link
        if log is None or link is None or not self.ready or len(self._asked) >= MAX_RECALLS:
            self.backplane.subscribed(channel)  # ``release`` undoes it
            self.failed_recalls += 1
            return succeed(Recall.nothing(None, since))
        self.recalls += 1
        request = next(self._requests)
        asked = self._asked[request] = _Asked(channel, since, log)
        clock = self.bus.clock
        if clock is not None:
            asked.timer = clock.callLater(RECALL_TIMEOUT, self._answer, request, None)
        # Hear the channel first: what is numbered after the answer must come live.
        self.backplane.subscribed(channel)
        if self.backplane.interest.active(self._keys_of(channel)[2]):
            self._ask(link, request)
        return asked.done

    def release(self, channel: str) -> None:
        self.backplane.unsubscribed(channel)

    def _ask(self, link: Link, request: int) -> None:
        asked = self._asked.get(request)
        if asked is None or asked.sent:
            return
        asked.sent = True
        sent = self._run(
            link, "RECALL", asked.channel, self.own_key, request, asked.log.size, new_epoch()
        )
        if sent is None:
            self._answer(request, None)

    def confirmed(self, key: bytes) -> None:
        """Redis confirmed ``SUBSCRIBE key``: the recalls waiting for it can ask now."""
        link = self.backplane.link
        if link is None:
            return
        for request, asked in list(self._asked.items()):
            if not asked.sent and self._keys_of(asked.channel)[2] == key:
                self._ask(link, request)

    def _run(self, link: Link, script: str, channel: str, *args: Any) -> Deferred[Any] | None:
        """``EVALSHA`` one of the scripts (by name) on ``channel``'s keys, then ``args``;
        None when the connection is gone already. A script Redis refuses ends the link."""
        position, stream, _ = self._keys_of(channel)
        assert link.publisher is not None
        try:
            reply: Deferred[Any] = link.publisher.execute_command(
                "EVALSHA", _SHAS[script], 2, position, stream, *args
            )
        except txredisapi.ConnectionError:
            return None
        return reply.addErrback(self._refused, link, script)

    def _refused(self, failure: Failure, link: Link, script: str) -> None:
        if not failure.check(txredisapi.ConnectionError):
            # A script error leaves the order of what follows unknown: start over.
            link.end(f"Redis refused the history script {script}: {describe_failure(failure)}")

    # What arrives on the subscribed connection

    def numbered(self, data: bytes, key: bytes) -> bool:
        """A numbered batch on ``key``; False when it is not one."""
        try:
            numbered = parse_numbered(data)
            frame = decode(numbered.frame)
        except (ValueError, WireError):
            return False
        if key != self._keys_of(frame.channel)[2]:
            return True  # another cluster whose prefix starts with ours and a colon
        if frame.node == self.node:
            flight = self._inflight.get(numbered.seq)
            if flight is None or flight.delivered:
                return True  # delivered already, unnumbered, when Redis went
            flight.delivered = True
            batch = flight.batch
            batch.offset, batch.epoch = numbered.first, numbered.epoch
            self.bus.deliver_numbered(batch, None if flight.sender.echo else flight.sender)
            return True
        batch = Batch(remote_origin(frame), frame.channel, frame.payloads, frame.kinds, frame.lines)
        batch.offset, batch.epoch = numbered.first, numbered.epoch
        inbox = self.backplane.inbox
        inbox.batches += 1
        inbox.messages += len(batch.payloads)
        self.bus.publish_remote(batch)
        return True

    def own(self, data: bytes) -> None:
        """A publication on this node's own channel: an acknowledgement or an answer."""
        if data.startswith(b"a"):
            flight = self._inflight.pop(int(data[1:]), None)
            if flight is not None:
                self._pending_bytes -= flight.size
            return
        try:
            recalled = parse_recalled(data, self.node)
        except ValueError as e:
            self.log.warn("history: ignored an unreadable answer from Redis ({problem})", problem=e)
            return
        asked = self._asked.get(recalled.request)
        if asked is None:
            return  # timed out meanwhile
        clock = self.bus.clock
        now = clock.seconds() if clock is not None else 0.0
        self._answer(
            recalled.request,
            owed(recalled, asked.channel, asked.since, asked.log.size, asked.log.ttl, now),
        )

    def _answer(self, request: int, found: Recall | None) -> None:
        asked = self._asked.pop(request, None)
        if asked is None:
            return
        if asked.timer is not None and asked.timer.active():
            asked.timer.cancel()
        if found is None:
            self.failed_recalls += 1
            found = Recall.nothing(None, asked.since)
        asked.done.callback(found)

    # The link (the backplane calls these)

    def prepare(self, link: Link) -> Deferred[Any]:
        """A new link: load the scripts, hear this node's own channel, and give a new
        epoch to every channel that went unnumbered meanwhile."""
        assert link.publisher is not None and link.subscriber is not None
        steps: list[Deferred[Any]] = [
            link.publisher.execute_command("SCRIPT", "LOAD", script)
            for script in (SEQUENCE, RECALL, RENEW)
        ]
        steps.append(
            link.subscriber.execute_command("SUBSCRIBE", self.own_key, apply_timeout=False)
        )
        for channel in sorted(self._unnumbered):
            renewed = self._run(link, "RENEW", channel, new_epoch())
            if renewed is not None:  # else the link has ended: the connect fails
                steps.append(renewed)
        return gatherResults(steps, consumeErrors=True)

    def went_up(self) -> None:
        if self._unnumbered:
            self.log.info(
                "history: {count} channel(s) got a new epoch: messages went out unnumbered "
                "while Redis was unreachable",
                count=len(self._unnumbered),
            )
        self._unnumbered.clear()
        self.ready = True

    def went_down(self) -> None:
        """Deliver here, unnumbered, what Redis had not published back; answer every
        waiting recall ``recovered:false``."""
        self.ready = False
        for request in list(self._asked):  # asked before those batches were sent
            self._answer(request, None)
        flights, self._inflight = self._inflight, {}
        self._pending_bytes = 0
        for flight in flights.values():
            self._went_unnumbered(flight.batch.channel)
            if not flight.delivered:
                batch = flight.batch
                batch.offset, batch.epoch = 0, None
                self.bus.deliver_numbered(batch, None if flight.sender.echo else flight.sender)

    def _went_unnumbered(self, channel: str) -> None:
        if len(self._unnumbered) < self.history.max_channels:
            self._unnumbered.add(channel)

    # The history's journal (``gateway.core.history.Journal``)

    def started(self, channel: str, log: ChannelLog) -> None:
        pass

    def recorded(self, channel: str, log: ChannelLog, run: Any) -> None:
        pass

    def resized(self, channel: str, log: ChannelLog) -> None:
        pass

    def forgotten(self, channel: str) -> None:
        """The channel keeps no history here now (a reload, or ``max_channels``): what
        this node publishes to it is not kept, so its history in Redis gets a new epoch —
        now, or once Redis is reachable."""
        link = self.backplane.link
        if link is None or not self.ready or self._run(link, "RENEW", channel, new_epoch()) is None:
            self._went_unnumbered(channel)

    def stats(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "sequenced_messages": self.sequenced,
            "in_flight_batches": len(self._inflight),
            "pending_bytes": self._pending_bytes,
            "overflowed_messages": self.overflowed,
            "recalls": self.recalls,
            "failed_recalls": self.failed_recalls,
        }


def keep_history(backplane: Backplane) -> RedisArchive:
    """Keep the history of channels in Redis: the bus's archive from now on."""
    archive = backplane.archive = backplane.inbox.archive = RedisArchive(
        backplane, backplane.bus.history
    )
    backplane.bus.archive = archive
    return archive
