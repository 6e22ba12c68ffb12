"""Channel history: the last messages of each channel that keeps some, for peers that join.

How many messages a channel keeps comes from a function of its name (the
config's ``[channels.NAME]`` tables, patterns included), asked once per
channel and again after a reload (``resize``). A channel that keeps nothing
costs one dict entry; at most ``max_channels`` channels are remembered, and
over that the ones keeping nothing are forgotten first (then the oldest).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from gateway.core.message import Batch, Kind, Origin

Entry = tuple[Origin, bytes, Kind | None]
_UNKNOWN = object()


def _none(channel: str) -> int:
    return 0


class History:
    """Bounded per-channel deques of ``(origin, payload, kind)``."""

    def __init__(self, size_of: Callable[[str], int] = _none, max_channels: int = 100_000) -> None:
        self.size_of = size_of
        self.max_channels = max_channels
        self._kept: dict[str, deque[Entry] | None] = {}

    def of(self, channel: str) -> deque[Entry] | None:
        """The deque of ``channel``, or None when it keeps no history."""
        kept = self._kept.get(channel, _UNKNOWN)
        if kept is _UNKNOWN:
            size = self.size_of(channel)
            kept = deque(maxlen=size) if size > 0 else None
            if len(self._kept) >= self.max_channels:
                self._make_room()
            self._kept[channel] = kept
        return kept  # type: ignore[return-value]

    def _make_room(self) -> None:
        empty = [name for name, kept in self._kept.items() if kept is None]
        for name in empty:
            del self._kept[name]
        if len(self._kept) >= self.max_channels:
            del self._kept[next(iter(self._kept))]

    def record(self, batch: Batch) -> None:
        """Remember ``batch`` if its channel keeps history."""
        kept = self.of(batch.channel)
        if kept is not None:
            kinds = batch.kinds or (None,) * len(batch.payloads)
            kept.extend(zip((batch.origin,) * len(kinds), batch.payloads, kinds, strict=True))

    def replay(self, channel: str) -> Iterator[Batch]:
        """The kept messages of ``channel``, oldest first, one batch each (``history=True``)."""
        kept = self.of(channel)
        for origin, payload, kind in tuple(kept or ()):
            yield Batch(
                origin, channel, (payload,), None if kind is None else (kind,), history=True
            )

    def resize(self, size_of: Callable[[str], int] | None = None) -> None:
        """Sizes changed (a reload): keep what still fits, drop what keeps nothing now."""
        if size_of is not None:
            self.size_of = size_of
        for channel, kept in list(self._kept.items()):
            size = self.size_of(channel)
            if size <= 0:
                self._kept[channel] = None
            elif kept is None or kept.maxlen != size:
                self._kept[channel] = deque(kept or (), maxlen=size)
