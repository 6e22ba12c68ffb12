"""Channel names and subscription patterns, as nats-server has them.

A name is 1-128 bytes of letters, digits and ``_ - : @ /`` in tokens separated
by ``.`` (no empty token): ``room.42``, ``sensors.7.temp``. A pattern may also
use wildcards: ``*`` is exactly one token (``room.*`` matches ``room.42``, not
``room.42.x``), and ``>`` as the last token is one or more tokens
(``sensors.>`` matches ``sensors.7`` and ``sensors.7.temp``). Publishing needs a
name; only subscriptions take patterns.

``PatternIndex`` answers "which patterns match this name" with a bounded cache,
so matching a published channel costs a dict lookup however many wildcard
subscriptions there are.
"""

from __future__ import annotations

import re

MAX_NAME_BYTES = 128
_TOKEN = r"[A-Za-z0-9_\-:@/]+"
_NAME_RE = re.compile(rf"^{_TOKEN}(\.{_TOKEN})*$")
_PATTERN_TOKEN = re.compile(rf"^(?:{_TOKEN}|\*|>)$")

NAME_RULE = (
    "a channel name: 1-128 bytes of letters, digits and _ - : @ / in tokens "
    'separated by "." (no empty token), e.g. "room.42"'
)
PATTERN_RULE = NAME_RULE + ', where "*" may stand for one token and a last ">" for one or more'


def is_name(text: str) -> bool:
    """Whether ``text`` is a channel name one may publish to (no wildcards)."""
    return 0 < len(text.encode("utf-8")) <= MAX_NAME_BYTES and _NAME_RE.fullmatch(text) is not None


def is_pattern(text: str) -> bool:
    """Whether ``text`` is a name or a wildcard pattern one may subscribe to."""
    if not 0 < len(text.encode("utf-8")) <= MAX_NAME_BYTES:
        return False
    tokens = text.split(".")
    if not all(_PATTERN_TOKEN.fullmatch(token) for token in tokens):
        return False
    return ">" not in tokens[:-1]


def has_wildcard(pattern: str) -> bool:
    """Whether ``pattern`` (valid) is a wildcard pattern rather than a plain name."""
    return any(token in ("*", ">") for token in pattern.split("."))


def matches(pattern: str, name: str) -> bool:
    """Whether the channel ``name`` is one ``pattern`` subscribes to."""
    wanted = pattern.split(".")
    tokens = name.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def covers(outer: str, inner: str) -> bool:
    """Whether every channel name ``inner`` matches is one ``outer`` matches too
    (both names or patterns): ``room.>`` covers ``room.*`` and ``room.42``; ``room.*``
    does not cover ``room.>``."""
    wanted = outer.split(".")
    tokens = inner.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens):
            return False
        theirs = tokens[index]
        if theirs == ">" or token not in ("*", theirs):
            return False  # inner may have more tokens here, or another one
    return len(tokens) == len(wanted)


def specificity(pattern: str) -> tuple[int, int, int]:
    """Sort key: of several patterns matching one name, the greatest is the most specific.

    More literal tokens first (``room.42.*`` over ``room.*.*``), then ``*`` over ``>``
    (``room.*`` over ``room.>``), then more tokens.
    """
    tokens = pattern.split(".")
    literal = sum(1 for token in tokens if token not in ("*", ">"))
    return literal, 0 if tokens[-1] == ">" else 1, len(tokens)


class PatternIndex:
    """The wildcard patterns in use, and which of them match a name (cached).

    The cache holds at most ``cache_size`` names and is emptied whenever the
    set of patterns changes; with no patterns at all, ``matching`` is free.
    """

    def __init__(self, cache_size: int = 100_000) -> None:
        self.cache_size = cache_size
        self._patterns: dict[str, None] = {}
        self._cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._patterns)

    def __contains__(self, pattern: object) -> bool:
        return pattern in self._patterns

    def add(self, pattern: str) -> None:
        if pattern not in self._patterns:
            self._patterns[pattern] = None
            self._cache.clear()

    def discard(self, pattern: str) -> None:
        if self._patterns.pop(pattern, 0) is None:
            self._cache.clear()

    def matching(self, name: str) -> tuple[str, ...]:
        """The patterns that match ``name``, in the order they were added."""
        if not self._patterns:
            return ()
        found = self._cache.get(name)
        if found is None:
            found = tuple(p for p in self._patterns if matches(p, name))
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[name] = found
        return found
