"""Which Redis channels a node listens to, and which copy of a publication it takes.

A node subscribes only to what its own peers want: ``SUBSCRIBE <prefix>:room.42``
while a local peer is subscribed to the name ``room.42``, ``PSUBSCRIBE
<prefix>:room.*`` while one has a wildcard subscription (a gateway pattern
becomes a Redis glob: ``*`` and ``>`` both become ``*``, which may match more,
and the bus delivers only what really matches). So ``PUBSUB NUMSUB
<prefix>:room.42`` counts the nodes that have subscribers for ``room.42``.

Redis sends a publication once per matching subscription of a connection: as
a ``message`` for the channel and a ``pmessage`` per matching pattern. A node
takes exactly one of them: the ``message`` when it is subscribed to the channel,
else the ``pmessage`` of the first matching pattern (in sorted order). Only
subscriptions Redis has confirmed count, and the confirmations arrive on the
same connection in order with the publications, so no publication is taken
twice or lost while subscriptions change.
"""

from __future__ import annotations

import re
from collections import Counter

from gateway.core.channels import has_wildcard

Command = tuple[str, bytes]
"""A Redis command for the subscribed connection: (SUBSCRIBE etc., channel or glob)."""


def glob_of(prefix: str, pattern: str) -> bytes:
    """The Redis glob of a gateway pattern (names hold no glob special characters)."""
    tokens = ["*" if token in ("*", ">") else token for token in pattern.split(".")]
    return f"{prefix}:{'.'.join(tokens)}".encode()


class Interest:
    """What this node wants from Redis, and what Redis has confirmed."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._exact: Counter[bytes] = Counter()  # wanted channels, with how many wants each
        self._globs: Counter[bytes] = Counter()  # wanted globs, with how many patterns each
        self._active_exact: set[bytes] = set()
        self._active_globs: dict[bytes, re.Pattern[bytes]] = {}
        self._order: list[bytes] = []  # active globs, sorted

    def key(self, channel: str) -> bytes:
        return f"{self.prefix}:{channel}".encode()

    def want(self, subscription: str) -> Command | None:
        """A local peer is the first to subscribe to ``subscription`` (name or pattern), or
        the history store needs a name's publications for a while (``reserve``): each
        ``want`` is undone by one ``unwant``."""
        if has_wildcard(subscription):
            glob = glob_of(self.prefix, subscription)
            self._globs[glob] += 1
            return ("PSUBSCRIBE", glob) if self._globs[glob] == 1 else None
        key = self.key(subscription)
        self._exact[key] += 1
        return ("SUBSCRIBE", key) if self._exact[key] == 1 else None

    def unwant(self, subscription: str) -> Command | None:
        """The last local subscriber of ``subscription`` is gone."""
        if has_wildcard(subscription):
            glob = glob_of(self.prefix, subscription)
            if self._globs[glob] <= 0:
                return None
            self._globs[glob] -= 1
            if self._globs[glob]:
                return None
            del self._globs[glob]
            return "PUNSUBSCRIBE", glob
        key = self.key(subscription)
        if self._exact[key] <= 0:
            return None
        self._exact[key] -= 1
        if self._exact[key]:
            return None
        del self._exact[key]
        return "UNSUBSCRIBE", key

    def wanted(self) -> list[Command]:
        """Everything to subscribe to on a new connection."""
        return [("SUBSCRIBE", key) for key in sorted(self._exact)] + [
            ("PSUBSCRIBE", glob) for glob in sorted(self._globs)
        ]

    def confirmed(self, command: Command) -> None:
        """Redis answered ``command``: from now on its publications come (or stop) that way."""
        verb, name = command
        if verb == "SUBSCRIBE":
            self._active_exact.add(name)
        elif verb == "UNSUBSCRIBE":
            self._active_exact.discard(name)
        elif verb == "PSUBSCRIBE":
            self._active_globs[name] = re.compile(
                b".*".join(re.escape(part) for part in name.split(b"*")), re.DOTALL
            )
            self._order = sorted(self._active_globs)
        else:
            self._active_globs.pop(name, None)
            self._order = sorted(self._active_globs)

    def active(self, key: bytes) -> bool:
        """Whether Redis has confirmed ``SUBSCRIBE key`` (its publications come now)."""
        return key in self._active_exact

    def reset(self) -> None:
        """The subscribed connection is gone: nothing is active any more."""
        self._active_exact.clear()
        self._active_globs.clear()
        self._order = []

    def take(self, channel: bytes, pattern: bytes | None) -> bool:
        """Whether to take this copy of a publication on ``channel`` (``pattern``: the
        glob it came through, None for a plain ``message``)."""
        if channel in self._active_exact:
            return pattern is None
        if pattern is None:
            return False  # subscribed no longer (an unsubscribe on its way)
        for glob in self._order:
            if self._active_globs[glob].fullmatch(channel):
                return glob == pattern
        return False
