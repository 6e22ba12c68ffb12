"""Starting to receive a channel that keeps history: what a peer is sent first.

A peer that joins (its own channel) or subscribes to a channel name gets the
channel's position, then its last messages, or with ``since`` the messages it
missed (``Recall``). With the memory or sqlite store the bus's ``History``
answers at once. With a history store shared by a cluster (an ``Archive``:
``[history] store = "redis"``) the answer comes later, so the peer's
subscription begins only when it does, in the same step as the answer: no
live message can reach the peer before the messages it is owed, and none is
sent twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from twisted.internet.defer import Deferred

from gateway.core.history import History, may_replay
from gateway.core.interfaces import IPeer
from gateway.core.message import Batch

if TYPE_CHECKING:
    from gateway.core.bus import Bus


class Recall(NamedTuple):
    """What a peer starting on a channel is owed."""

    position: tuple[int, str] | None  # (last offset, epoch); None: the channel keeps none
    batches: list[Batch]  # recovered (marked so), or the last messages (marked history)
    recovered: bool | None  # with ``since``: whether ``batches`` is all it missed

    @classmethod
    def nothing(cls, position: tuple[int, str] | None, since: tuple[int, str] | None) -> Recall:
        """Nothing to send: with ``since``, ``recovered:false`` (the peer may have missed
        messages)."""
        return cls(position, [], None if since is None else False)

    def denied(self) -> Recall:
        """The same for a peer that may not have the channel's history."""
        return Recall(self.position, [], None if self.recovered is None else False)


class Archive(Protocol):
    """A history store shared by the nodes of a cluster: it numbers the batches of the
    channels that keep history and delivers them itself, on every node in one order."""

    def keeps(self, channel: str) -> bool:
        """Whether ``channel`` keeps history (its batches go through the archive)."""

    def sequence(self, sender: IPeer, batch: Batch) -> bool:
        """Take ``batch`` of a local sender to number and deliver (True), or leave its
        delivery to the bus, unnumbered (False: the store is unreachable)."""

    def recall(self, channel: str, since: tuple[int, str] | None) -> Deferred[Recall]:
        """The channel's position and last messages, or what came after ``since``;
        never fails (an unreachable store answers ``recovered:false``)."""

    def release(self, channel: str) -> None:
        """The peer a ``recall`` was for receives the channel now (or never will)."""


def local_recall(
    history: History, peer: IPeer, channel: str, since: tuple[int, str] | None
) -> Recall:
    """The answer of the bus's own ``History`` (the memory and sqlite stores)."""
    position = history.position(channel)
    if not may_replay(peer, channel):
        return Recall.nothing(position, since)
    if since is not None:
        missed = history.since(channel, *since)
        if missed is not None:
            return Recall(position, missed, True)
    return Recall(position, history.replay(channel), None if since is None else False)


def recall(
    bus: Bus,
    peer: IPeer,
    channel: str,
    since: tuple[int, str] | None,
    then: Callable[[Recall], object],
    start: bool = False,
) -> None:
    """Work out what ``peer`` is owed on ``channel`` and hand it to ``then`` — at once,
    or when the archive answers (not at all if the peer has gone meanwhile). With
    ``start`` the peer's subscription to its own channel begins right before ``then``."""
    archive = bus.archive
    if archive is None or not archive.keeps(channel):
        if start:
            bus.start(peer)
        then(local_recall(bus.history, peer, channel, since))
        return

    def answered(answer: Recall) -> None:
        try:
            if bus.is_attached(peer):
                if start:
                    bus.start(peer)
                then(answer if may_replay(peer, channel) else answer.denied())
        finally:
            archive.release(channel)

    archive.recall(channel, since).addCallback(answered).addErrback(
        lambda failure: bus.log.failure(
            "starting {peer} on {channel} failed",
            failure,
            peer=peer.origin.peer_id,
            channel=channel,
        )
    )
