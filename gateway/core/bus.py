"""The broadcast bus: channels of peers, and fan-out of batches to them.

The bus knows peers only through ``IPeer``. A batch is framed once per framer
(that is, once per kind of receiver) and each receiver gets one ``deliver``
call per batch, which is what makes fan-out fast.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.core.history import History
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Origin
from gateway.core.metrics import Metrics

MAX_QUEUED_PUBLISHES = 10_000
"""At most this many batches published from inside one fan-out wait for it (a guard
against peers that answer each other forever)."""


class _Group:
    """The peers of one channel that share a framer."""

    __slots__ = ("bytes", "framer", "members", "messages", "snapshot")

    def __init__(self, framer: IFramer) -> None:
        self.framer = framer
        self.members: dict[IPeer, None] = {}
        # Messages and payload bytes framed for this group so far: a member's
        # "out" counts are these minus what they were when it joined.
        self.messages = 0
        self.bytes = 0
        # Rebuilt lazily after a change, so a receiver that detaches while a
        # batch is being delivered never disturbs the loop.
        self.snapshot: tuple[IPeer, ...] | None = ()


class _Entry:
    """What the bus remembers about one attached peer, for ``peer_info``."""

    __slots__ = (
        "base_bytes",
        "base_messages",
        "bytes_in",
        "group",
        "messages_in",
        "since",
        "skipped_bytes",
        "skipped_messages",
    )

    def __init__(self, group: _Group, since: float) -> None:
        self.group = group
        self.since = since
        self.base_messages = group.messages
        self.base_bytes = group.bytes
        self.messages_in = 0
        self.bytes_in = 0
        self.skipped_messages = 0
        self.skipped_bytes = 0


class RemotePeer:
    """A peer attached to another node, as presence watchers see it."""

    __slots__ = ("channel", "origin")

    def __init__(self, origin: Origin, channel: str) -> None:
        self.origin = origin
        self.channel = channel


class Backplane(Protocol):
    """What the bus needs from a cluster backplane (see ``gateway.cluster``)."""

    def forward(self, batch: Batch) -> None:
        """Send a locally published batch to the other nodes (never blocks)."""

    def presence(self, event: str, origin: Origin, channel: str) -> None:
        """Tell the other nodes a local peer joined or left ``channel``."""


PresenceWatcher = Callable[[str, "IPeer | RemotePeer", int], None]
"""Called with ("join" or "leave", the peer, peers attached to this node after the change)."""


class Bus:
    """Named channels; every batch goes to every other peer on its channel."""

    log = Logger()

    def __init__(
        self,
        metrics: Metrics | None = None,
        clock: IReactorTime | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self.timer = timer
        self._entries: dict[IPeer, _Entry] = {}
        self.history = History()
        self._channels: dict[str, dict[IFramer, _Group]] = {}
        self._ids: dict[str, itertools.count[int]] = {}
        self._peer_count = 0
        self._watchers: dict[str, dict[PresenceWatcher, None]] = {}
        self.backplane: Backplane | None = None
        # Publishes made while a fan-out runs, delivered right after it.
        self._fanning = False
        self._queued: deque[tuple[IPeer, Batch]] = deque()

    def watch_presence(self, channel: str, watcher: PresenceWatcher) -> None:
        """Call ``watcher`` whenever a peer joins or leaves ``channel``."""
        self._watchers.setdefault(channel, {})[watcher] = None

    def unwatch_presence(self, channel: str, watcher: PresenceWatcher) -> None:
        """Stop calling ``watcher``; harmless when it is not watching."""
        watchers = self._watchers.get(channel)
        if watchers is not None:
            watchers.pop(watcher, None)
            if not watchers:
                del self._watchers[channel]

    def _announce(self, event: str, peer: IPeer) -> None:
        self._tell_watchers(event, peer, peer.channel)
        if self.backplane is not None:
            self.backplane.presence(event, peer.origin, peer.channel)

    def announce_remote(self, event: str, origin: Origin, channel: str) -> None:
        """A peer of another node joined ("join") or left ("leave") ``channel``."""
        self._tell_watchers(event, RemotePeer(origin, channel), channel)

    def _tell_watchers(self, event: str, peer: IPeer | RemotePeer, channel: str) -> None:
        for watcher in tuple(self._watchers.get(channel, ())):
            try:
                watcher(event, peer, self._peer_count)
            except Exception:
                self.log.failure("presence watcher failed")

    @property
    def peer_count(self) -> int:
        """Peers attached, over all channels and transports."""
        return self._peer_count

    def new_peer_id(self, prefix: str) -> str:
        """A peer id unique in this process, e.g. ``tcp-7``."""
        counter = self._ids.setdefault(prefix, itertools.count(1))
        return f"{prefix}-{next(counter)}"

    def peers(self, channel: str | None = None) -> list[IPeer]:
        """The attached peers, of one channel or all."""
        names = [channel] if channel is not None else list(self._channels)
        return [
            peer
            for name in names
            for group in self._channels.get(name, {}).values()
            for peer in group.members
        ]

    def attach(self, peer: IPeer) -> int:
        """Add ``peer`` to its channel; returns the number of peers attached."""
        groups = self._channels.setdefault(peer.channel, {})
        group = groups.get(peer.framer)
        if group is None:
            group = groups[peer.framer] = _Group(peer.framer)
        if peer not in group.members:
            group.members[peer] = None
            group.snapshot = None
            self._peer_count += 1
            self._entries[peer] = _Entry(group, self.clock.seconds() if self.clock else 0.0)
            self._announce("join", peer)
        return self._peer_count

    def detach(self, peer: IPeer) -> None:
        """Remove ``peer``; harmless when it is not attached."""
        groups = self._channels.get(peer.channel)
        if groups is None:
            return
        group = groups.get(peer.framer)
        if group is None or peer not in group.members:
            return
        del group.members[peer]
        group.snapshot = None
        self._peer_count -= 1
        self._retire(peer)
        if not group.members:
            del groups[peer.framer]
            if not groups:
                del self._channels[peer.channel]
        self._announce("leave", peer)

    def publish(self, sender: IPeer, batch: Batch) -> int:
        """Deliver ``batch`` from a local peer; returns local receivers reached.

        A receiver that fails is closed; its failure never reaches the sender.
        With a backplane, the batch then goes to the other nodes too. A batch
        published *during* a fan-out (by a receiver that answers at once, such
        as an application peer) waits until that fan-out is done, so an answer
        never reaches anyone before the message it answers; it returns 0.
        """
        if self._fanning:
            if len(self._queued) >= MAX_QUEUED_PUBLISHES:
                self.metrics.drop("publish_loop", len(batch.payloads))
                self.log.warn(
                    "{peer} published over {limit} batches from inside deliveries; dropped",
                    peer=sender.origin.peer_id,
                    limit=MAX_QUEUED_PUBLISHES,
                )
                return 0
            self._queued.append((sender, batch))
            return 0
        self._fanning = True
        try:
            reached = self._publish(sender, batch)
            while self._queued:
                self._publish(*self._queued.popleft())
        finally:
            self._fanning = False
            self._queued.clear()
        return reached

    def _publish(self, sender: IPeer, batch: Batch) -> int:
        origin = batch.origin
        count = len(batch.payloads)
        size = batch.byte_count()
        self.metrics.messages_received[origin.listener, origin.transport] += count
        self.metrics.bytes_received[origin.listener, origin.transport] += size
        entry = self._entries.get(sender)
        if entry is not None:
            entry.messages_in += count
            entry.bytes_in += size
        started = self.timer()
        reached = self._fan_out(batch, None if sender.echo else sender)
        self.metrics.fan_out_seconds.observe(self.timer() - started)
        if self.backplane is not None:
            self.backplane.forward(batch)
        return reached

    def publish_remote(self, batch: Batch) -> int:
        """Deliver ``batch`` that a peer of another node sent; returns receivers reached."""
        self.metrics.remote_messages_received += len(batch.payloads)
        return self._fan_out(batch, None)

    def _fan_out(self, batch: Batch, skip: IPeer | None) -> int:
        self.history.record(batch)
        groups = self._channels.get(batch.channel)
        if not groups:
            return 0
        reached = 0
        count = len(batch.payloads)
        size = -1
        for group in tuple(groups.values()):
            receivers = group.snapshot
            if receivers is None:
                receivers = group.snapshot = tuple(group.members)
            if len(receivers) == 1 and receivers[0] is skip:
                continue
            wire = group.framer.frame(batch)
            if wire is None:
                continue
            if size < 0:
                size = batch.byte_count()
            group.messages += count
            group.bytes += size
            for peer in receivers:
                if peer is skip:
                    entry = self._entries.get(peer)
                    if entry is not None:
                        entry.skipped_messages += count
                        entry.skipped_bytes += size
                    continue
                try:
                    peer.deliver(wire)
                except Exception:
                    self._receiver_failed(peer)
                else:
                    reached += 1
        self.metrics.messages_delivered += reached * len(batch.payloads)
        return reached

    def replay_history(self, peer: IPeer) -> int:
        """Send ``peer`` its channel's remembered messages, oldest first; returns how many."""
        framer = peer.framer
        replayed = 0
        for batch in self.history.replay(peer.channel):
            wire = framer.frame(batch)
            if wire is not None:
                peer.deliver(wire)
                replayed += 1
        return replayed

    def _retire(self, peer: IPeer) -> None:
        """Fold a leaving peer's counts into the per-listener totals."""
        entry = self._entries.pop(peer, None)
        if entry is None:
            return
        messages, size = self._out(peer, entry)
        key = (peer.origin.listener, peer.origin.transport)
        self.metrics.retired_messages_out[key] += messages
        self.metrics.retired_bytes_out[key] += size

    def delivered_totals(self) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
        """Messages and payload bytes delivered so far, by receiving (listener, transport)."""
        messages = Counter(self.metrics.retired_messages_out)
        size = Counter(self.metrics.retired_bytes_out)
        for peer, entry in self._entries.items():
            out_messages, out_bytes = self._out(peer, entry)
            key = (peer.origin.listener, peer.origin.transport)
            messages[key] += out_messages
            size[key] += out_bytes
        return messages, size

    @staticmethod
    def _out(peer: IPeer, entry: _Entry) -> tuple[int, int]:
        """Messages and payload bytes handed to ``peer`` since it joined."""
        return (
            entry.group.messages
            - entry.base_messages
            - entry.skipped_messages
            - peer.dropped_messages,
            entry.group.bytes - entry.base_bytes - entry.skipped_bytes,
        )

    def attached(self, offset: int = 0, limit: int | None = None) -> list[IPeer]:
        """Attached peers in the order they joined (a page of them)."""
        peers = list(self._entries)
        return peers[offset : None if limit is None else offset + limit]

    def peer_info(self, peer: IPeer) -> dict[str, object] | None:
        """What ``/peers`` shows about ``peer`` (None when it is not attached)."""
        entry = self._entries.get(peer)
        if entry is None:
            return None
        messages_out, bytes_out = self._out(peer, entry)
        origin = peer.origin
        return {
            "id": origin.peer_id,
            "listener": origin.listener,
            "transport": origin.transport,
            "channel": peer.channel,
            "address": peer.address,
            "connected_since": entry.since,
            "messages_in": entry.messages_in,
            "bytes_in": entry.bytes_in,
            "messages_out": messages_out,
            "bytes_out": bytes_out,
            "pending_bytes": peer.pending_bytes,
            "tls_subject": peer.subject,
        }

    def _receiver_failed(self, peer: IPeer) -> None:
        self.log.failure("delivery to {peer} failed; closing it", peer=peer.origin.peer_id)
        self.metrics.disconnect("delivery_error")
        try:
            peer.close("delivery failed")
        except Exception:
            self.log.failure("closing {peer} failed", peer=peer.origin.peer_id)
            self.detach(peer)

    def close_all(self, reason: str) -> None:
        """Close every attached peer (used when the gateway stops)."""
        for peer in self.peers():
            peer.close(reason)
