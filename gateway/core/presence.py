"""Presence: who joins and leaves a channel, for the watchers of that channel."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from gateway.core.interfaces import IPeer
from gateway.core.message import Origin


class RemotePeer:
    """A peer attached to another node, as presence watchers see it."""

    __slots__ = ("channel", "origin")

    def __init__(self, origin: Origin, channel: str) -> None:
        self.origin = origin
        self.channel = channel


PresenceWatcher = Callable[[str, "IPeer | RemotePeer", int], None]
"""Called with ("join" or "leave", the peer, peers attached to this node after the change)."""


class Presence:
    """The watchers of each channel (by exact name)."""

    log = Logger()

    def __init__(self) -> None:
        self._watchers: dict[str, dict[PresenceWatcher, None]] = {}

    def watch(self, channel: str, watcher: PresenceWatcher) -> None:
        self._watchers.setdefault(channel, {})[watcher] = None

    def unwatch(self, channel: str, watcher: PresenceWatcher) -> None:
        watchers = self._watchers.get(channel)
        if watchers is not None:
            watchers.pop(watcher, None)
            if not watchers:
                del self._watchers[channel]

    def tell(self, event: str, peer: IPeer | RemotePeer, channel: str, count: int) -> None:
        """``peer`` joined or left ``channel``; a failing watcher never stops the others."""
        for watcher in tuple(self._watchers.get(channel, ())):
            try:
                watcher(event, peer, count)
            except Exception:
                self.log.failure("presence watcher failed")
