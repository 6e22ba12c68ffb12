"""Subscriptions: which peers receive the messages of a channel.

Peers subscribe to names (``room.42``) and patterns (``room.*``, ``sensors.>``).
A subscription lives in a ``Group``: the peers of one name or pattern that
share a framer. For a published channel, ``Routes.parts`` gives one ``Part``
per framer: the framer runs once for it, and each receiver in it appears
once, however many of its subscriptions match. Parts are cached per channel
and rebuilt only after a change that concerns the channel, so a publish
costs a dict lookup however many wildcard subscriptions exist.
"""

from __future__ import annotations

from collections import Counter

from gateway.core.channels import PatternIndex, has_wildcard
from gateway.core.interfaces import IFramer, IPeer


class Group:
    """The peers subscribed to one name or pattern that share a framer."""

    __slots__ = ("bytes", "framer", "key", "members", "messages")

    def __init__(self, key: str, framer: IFramer) -> None:
        self.key = key
        self.framer = framer
        self.members: dict[IPeer, None] = {}
        # Messages and payload bytes framed for this group so far: a member's
        # "out" counts are these minus what they were when it subscribed.
        self.messages = 0
        self.bytes = 0


class Part:
    """What the receivers of one channel that share a framer get."""

    __slots__ = ("duplicates", "framer", "groups", "receivers")

    def __init__(self, framer: IFramer, groups: list[Group], channel: str) -> None:
        self.framer = framer
        self.groups = tuple(groups)
        seen = Counter(peer for group in groups for peer in group.members)
        # Each receiver once; counted in every group it is in, so the extra
        # counts are credited back to it (``duplicates``: one per extra group).
        # A peer whose permissions deny the channel gets nothing through any
        # subscription: credited back for each of its groups.
        receivers = []
        duplicates = []
        for peer, groups_in in seen.items():
            permissions = peer.permissions
            if permissions is None or permissions.may_receive(channel):
                receivers.append(peer)
                duplicates.extend([peer] * (groups_in - 1))
            else:
                duplicates.extend([peer] * groups_in)
        self.receivers = tuple(receivers)
        self.duplicates = tuple(duplicates)


class Routes:
    """Every subscription of one bus, and the parts of each published channel."""

    def __init__(self, cache_size: int = 100_000) -> None:
        self.exact: dict[str, dict[IFramer, Group]] = {}
        self.wildcard: dict[str, dict[IFramer, Group]] = {}
        self.index = PatternIndex(cache_size)
        self.cache_size = cache_size
        self._parts: dict[str, tuple[Part, ...]] = {}

    @property
    def keys(self) -> int:
        """Names and patterns with at least one subscriber."""
        return len(self.exact) + len(self.wildcard)

    def has(self, key: str) -> bool:
        """Whether any peer is subscribed to exactly ``key``."""
        return key in (self.wildcard if has_wildcard(key) else self.exact)

    def add(self, key: str, peer: IPeer) -> Group | None:
        """Subscribe ``peer`` to ``key``; its group, or None if it was subscribed already."""
        wildcard = has_wildcard(key)
        table = self.wildcard if wildcard else self.exact
        groups = table.get(key)
        if groups is None:
            groups = table[key] = {}
            if wildcard:
                self.index.add(key)
        group = groups.get(peer.framer)
        if group is None:
            group = groups[peer.framer] = Group(key, peer.framer)
        if peer in group.members:
            return None
        group.members[peer] = None
        self._changed(key, wildcard)
        return group

    def remove(self, key: str, peer: IPeer) -> Group | None:
        """Unsubscribe ``peer`` from ``key``; its former group, or None if it had none."""
        wildcard = has_wildcard(key)
        table = self.wildcard if wildcard else self.exact
        groups = table.get(key)
        group = groups.get(peer.framer) if groups is not None else None
        if groups is None or group is None or peer not in group.members:
            return None
        del group.members[peer]
        if not group.members:
            del groups[peer.framer]
            if not groups:
                del table[key]
                if wildcard:
                    self.index.discard(key)
        self._changed(key, wildcard)
        return group

    def _changed(self, key: str, wildcard: bool) -> None:
        # A fan-out under way keeps the tuples it took; only later publishes see this.
        if wildcard:
            self._parts.clear()
        else:
            self._parts.pop(key, None)

    def forget(self) -> None:
        """Rebuild every channel's parts when next published (permissions changed)."""
        self._parts.clear()

    def members(self, key: str) -> list[IPeer]:
        """The peers subscribed to exactly ``key`` (a name or a pattern)."""
        table = self.wildcard if has_wildcard(key) else self.exact
        return [peer for group in table.get(key, {}).values() for peer in group.members]

    def parts(self, channel: str) -> tuple[Part, ...]:
        """One part per framer with receivers of ``channel`` (empty when nobody listens)."""
        parts = self._parts.get(channel)
        if parts is not None:
            return parts
        by_framer: dict[IFramer, list[Group]] = {}
        for group in self.exact.get(channel, {}).values():
            by_framer.setdefault(group.framer, []).append(group)
        for pattern in self.index.matching(channel):
            for group in self.wildcard[pattern].values():
                by_framer.setdefault(group.framer, []).append(group)
        parts = tuple(Part(framer, groups, channel) for framer, groups in by_framer.items())
        if parts:
            if len(self._parts) >= self.cache_size:
                self._parts.clear()
            self._parts[channel] = parts
        return parts
