"""The broadcast bus: peers, their subscriptions, and fan-out of batches to them.

The bus knows peers only through ``IPeer``. Every peer is subscribed to its
own ``channel`` while attached, and may subscribe to more names and patterns
(``gateway.core.channels``). A batch on channel C reaches every other peer
with a subscription matching C, once however many match. It is framed once
per framer (that is, once per kind of receiver) and each receiver gets one
``deliver`` call per batch, which is what makes fan-out fast.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.core.accounting import Entry
from gateway.core.archive import Archive, recall
from gateway.core.channels import has_wildcard, is_pattern
from gateway.core.history import History, deliver_all
from gateway.core.interfaces import IPeer
from gateway.core.message import Batch, Origin
from gateway.core.metrics import Metrics
from gateway.core.presence import Presence, PresenceWatcher, RemotePeer
from gateway.core.routing import Routes

__all__ = ["Backplane", "Bus", "PresenceWatcher", "RemotePeer", "SubscriptionError"]

MAX_QUEUED_PUBLISHES = 10_000
"""At most this many batches published from inside one fan-out wait for it (a guard
against peers that answer each other forever)."""


class SubscriptionError(Exception):
    """A subscription the bus refused: ``code`` (documented) and a ``reason`` for people."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class Backplane(Protocol):
    """What the bus needs from a cluster backplane (see ``gateway.cluster``)."""

    def forward(self, batch: Batch) -> None:
        """Send a locally published batch to the other nodes (never blocks)."""

    def presence(self, event: str, origin: Origin, channel: str) -> None:
        """Tell the other nodes a local peer joined or left ``channel``."""

    def subscribed(self, subscription: str) -> None:
        """The first local peer subscribed to ``subscription`` (a name or pattern)."""

    def unsubscribed(self, subscription: str) -> None:
        """The last local subscriber of ``subscription`` has gone."""


class Bus:
    """Subscriptions by name and pattern; every batch goes to every other peer that wants it."""

    log = Logger()

    def __init__(
        self,
        metrics: Metrics | None = None,
        clock: IReactorTime | None = None,
        timer: Callable[[], float] = time.perf_counter,
        max_subscriptions: int = 100,
        max_channels: int = 100_000,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self.timer = timer
        # [limits]: subscriptions per peer, and names and patterns subscribed at once.
        self.max_subscriptions = max_subscriptions
        self.max_channels = max_channels
        self.routes = Routes(max_channels)
        self.history = History(max_channels=max_channels, clock=clock)
        self.presence = Presence()
        self._entries: dict[IPeer, Entry] = {}
        self._ids: dict[str, itertools.count[int]] = {}
        self.backplane: Backplane | None = None
        # A history store shared by a cluster: it numbers and delivers history channels.
        self.archive: Archive | None = None
        # Publishes made while a fan-out runs, delivered right after it.
        self._fanning = False
        self._queued: deque[tuple[IPeer, Batch]] = deque()

    # Presence

    def watch_presence(self, channel: str, watcher: PresenceWatcher) -> None:
        """Call ``watcher`` whenever a peer subscribes to or leaves exactly ``channel``."""
        self.presence.watch(channel, watcher)

    def unwatch_presence(self, channel: str, watcher: PresenceWatcher) -> None:
        """Stop calling ``watcher``; harmless when it is not watching."""
        self.presence.unwatch(channel, watcher)

    def _announce(self, event: str, peer: IPeer, channel: str) -> None:
        if has_wildcard(channel):
            return  # presence is per channel name, never per pattern
        self.presence.tell(event, peer, channel, len(self._entries))
        if self.backplane is not None:
            self.backplane.presence(event, peer.origin, channel)

    def announce_remote(self, event: str, origin: Origin, channel: str) -> None:
        """A peer of another node joined ("join") or left ("leave") ``channel``."""
        self.presence.tell(event, RemotePeer(origin, channel), channel, len(self._entries))

    # Peers

    @property
    def peer_count(self) -> int:
        """Peers attached, over all channels and transports."""
        return len(self._entries)

    def new_peer_id(self, prefix: str) -> str:
        """A peer id unique in this process, e.g. ``tcp-7``."""
        counter = self._ids.setdefault(prefix, itertools.count(1))
        return f"{prefix}-{next(counter)}"

    def peers(self, channel: str | None = None) -> list[IPeer]:
        """The attached peers: all, or those subscribed to exactly ``channel``."""
        if channel is None:
            return list(self._entries)
        return self.routes.members(channel)

    def attach(self, peer: IPeer, later: bool = False) -> int:
        """Add ``peer``, subscribed to its channel (if its permissions allow that);
        returns the number of peers attached. With ``later``, a channel the archive
        keeps is subscribed to by ``replay_history`` (or ``gateway.core.archive.recall``
        with ``start``), which the caller then calls."""
        if peer not in self._entries:
            self._entries[peer] = Entry(self.clock.seconds() if self.clock else 0.0)
            archive = self.archive
            if not later or archive is None or not archive.keeps(peer.channel):
                self.start(peer)
        return len(self._entries)

    def start(self, peer: IPeer) -> None:
        """Subscribe an attached ``peer`` to its own channel, if it is not and may."""
        entry = self._entries.get(peer)
        if entry is None or entry.has(peer.channel):
            return
        permissions = peer.permissions
        if permissions is None or permissions.may_subscribe(peer.channel):
            self._subscribe(peer, peer.channel, entry)
        else:
            self.metrics.deny("subscribe")

    def is_attached(self, peer: IPeer) -> bool:
        return peer in self._entries

    def detach(self, peer: IPeer) -> None:
        """Remove ``peer`` and its subscriptions; harmless when it is not attached."""
        entry = self._entries.get(peer)
        if entry is None:
            return
        keys = entry.subscriptions()
        for key in keys:
            group = self.routes.remove(key, peer)
            if group is not None:
                entry.remove(group)
                self._unsubscribed(key)
        del self._entries[peer]
        self._retire(peer, entry)
        for key in keys:
            self._announce("leave", peer, key)

    def subscribe(self, peer: IPeer, pattern: str) -> bool:
        """Subscribe an attached ``peer`` to a name or pattern; False if it already was.

        Raises ``SubscriptionError``: ``bad_channel``, ``forbidden`` (its permissions),
        ``too_many_subscriptions`` (``max_subscriptions``), ``too_many_channels``
        (``max_channels``).
        """
        entry = self._entries.get(peer)
        if entry is None:
            raise SubscriptionError("bad_request", "not attached")
        if not is_pattern(pattern):
            raise SubscriptionError("bad_channel", f"not a channel name or pattern: {pattern!r}")
        if entry.has(pattern):
            return False
        permissions = peer.permissions
        if permissions is not None and not permissions.may_subscribe(pattern):
            self.metrics.deny("subscribe")
            raise SubscriptionError("forbidden", f"not allowed to subscribe to {pattern!r}")
        if entry.count() >= self.max_subscriptions:
            raise SubscriptionError(
                "too_many_subscriptions", f"at most {self.max_subscriptions} per peer"
            )
        if self.routes.keys >= self.max_channels and not self.routes.members(pattern):
            raise SubscriptionError(
                "too_many_channels", f"the gateway has {self.max_channels} channels in use"
            )
        self._subscribe(peer, pattern, entry)
        return True

    def _subscribe(self, peer: IPeer, pattern: str, entry: Entry | None = None) -> None:
        first = not self.routes.has(pattern)
        group = self.routes.add(pattern, peer)
        if group is not None:
            (entry or self._entries[peer]).add(group)
            if first and self.backplane is not None:
                self.backplane.subscribed(pattern)
            self._announce("join", peer, pattern)

    def _unsubscribed(self, pattern: str) -> None:
        if self.backplane is not None and not self.routes.has(pattern):
            self.backplane.unsubscribed(pattern)

    def unsubscribe(self, peer: IPeer, pattern: str) -> None:
        """End a subscription; raises ``SubscriptionError("not_subscribed", ...)`` without one."""
        entry = self._entries.get(peer)
        group = self.routes.remove(pattern, peer) if entry is not None else None
        if entry is None or group is None:
            raise SubscriptionError("not_subscribed", f"not subscribed to {pattern!r}")
        entry.remove(group)
        self._unsubscribed(pattern)
        self._announce("leave", peer, pattern)

    def recheck(self, only: IPeer | None = None) -> list[tuple[IPeer, str]]:
        """Permissions changed (a reload; or ``only`` one peer's): end every subscription
        no longer allowed, and let deliveries follow the new rules. Returns the (peer,
        subscription) ended."""
        ended = []
        entries = self._entries
        for peer, entry in list(entries.items() if only is None else [(only, entries[only])]):
            permissions = peer.permissions
            if permissions is None:
                continue
            for pattern in entry.subscriptions():
                if not permissions.may_subscribe(pattern):
                    self.unsubscribe(peer, pattern)
                    ended.append((peer, pattern))
        self.routes.forget()
        return ended

    def subscription_count(self) -> int:
        """Subscriptions of all attached peers (counted when asked)."""
        return sum(entry.count() for entry in self._entries.values())

    def subscriptions(self, peer: IPeer) -> list[str]:
        """The names and patterns ``peer`` is subscribed to, its channel first."""
        entry = self._entries.get(peer)
        return entry.subscriptions() if entry is not None else []

    # Publishing

    def publish(self, sender: IPeer, batch: Batch) -> int:
        """Deliver ``batch`` from a local peer; returns local receivers reached.

        A batch to a channel the sender may not publish to goes nowhere (the
        sender is told: ``forbidden``). A receiver that fails is closed; its
        failure never reaches the sender.
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
        permissions = sender.permissions
        if permissions is not None and not permissions.may_publish(batch.channel):
            self.metrics.deny("publish")
            self.metrics.drop("forbidden", len(batch.payloads))
            sender.forbidden("publish", batch.channel)
            return 0
        origin = batch.origin
        count = len(batch.payloads)
        size = batch.byte_count()
        self.metrics.messages_received[origin.listener, origin.transport] += count
        self.metrics.bytes_received[origin.listener, origin.transport] += size
        entry = self._entries.get(sender)
        if entry is not None:
            entry.messages_in += count
            entry.bytes_in += size
        archive = self.archive
        if archive is not None and archive.sequence(sender, batch):
            return 0  # numbered, and delivered when Redis publishes it (every node alike)
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

    def deliver_numbered(self, batch: Batch, skip: IPeer | None) -> int:
        """Deliver a local sender's ``batch`` once the archive numbered it (``skip``: the
        sender, unless it wants its own messages)."""
        return self._fan_out(batch, skip)

    def _fan_out(self, batch: Batch, skip: IPeer | None) -> int:
        self.history.record(batch)
        parts = self.routes.parts(batch.channel)
        if not parts:
            return 0
        reached = 0
        count = len(batch.payloads)
        size = -1
        for part in parts:
            receivers = part.receivers
            if not receivers or (len(receivers) == 1 and receivers[0] is skip):
                continue
            wire = part.framer.frame(batch)
            if wire is None:
                continue
            if size < 0:
                size = batch.byte_count()
            for group in part.groups:
                group.messages += count
                group.bytes += size
            for peer in part.duplicates:
                self._skipped(peer, count, size)
            for peer in receivers:
                if peer is skip:
                    self._skipped(peer, count, size)
                    continue
                try:
                    peer.deliver(wire)
                except Exception:
                    self._receiver_failed(peer)
                else:
                    reached += 1
        self.metrics.messages_delivered += reached * count
        return reached

    def _skipped(self, peer: IPeer, count: int, size: int) -> None:
        """A group counted a batch that ``peer`` did not get through it."""
        entry = self._entries.get(peer)
        if entry is not None:
            entry.skipped_messages += count
            entry.skipped_bytes += size

    def replay_history(self, peer: IPeer) -> None:
        """Send a peer that just attached its channel's last messages, oldest first, if it
        may receive them (subscribing it then, when ``attach`` left that for later)."""
        recall(self, peer, peer.channel, None, lambda found: deliver_all(peer, found.batches), True)

    # Counting

    def _retire(self, peer: IPeer, entry: Entry) -> None:
        """Fold a leaving peer's counts into the per-listener totals."""
        messages, size = entry.out(peer)
        key = (peer.origin.listener, peer.origin.transport)
        self.metrics.retired_messages_out[key] += messages
        self.metrics.retired_bytes_out[key] += size

    def delivered_totals(self) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
        """Messages and payload bytes delivered so far, by receiving (listener, transport)."""
        messages = Counter(self.metrics.retired_messages_out)
        size = Counter(self.metrics.retired_bytes_out)
        for peer, entry in self._entries.items():
            out_messages, out_bytes = entry.out(peer)
            key = (peer.origin.listener, peer.origin.transport)
            messages[key] += out_messages
            size[key] += out_bytes
        return messages, size

    def attached(self, offset: int = 0, limit: int | None = None) -> list[IPeer]:
        """Attached peers in the order they joined (a page of them)."""
        peers = list(self._entries)
        return peers[offset : None if limit is None else offset + limit]

    def peer_info(self, peer: IPeer) -> dict[str, object] | None:
        """What ``/peers`` shows about ``peer`` (None when it is not attached)."""
        entry = self._entries.get(peer)
        return None if entry is None else entry.info(peer)

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
