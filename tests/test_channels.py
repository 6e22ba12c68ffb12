"""Channel names and wildcard patterns (nats-server's rules)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.channels import PatternIndex, has_wildcard, is_name, is_pattern, matches


@pytest.mark.parametrize(
    "name",
    ["main", "room.42", "sensors.7.temp", "a", "user@example.org", "path/to:x", "A-b_C", "x" * 128],
)
def test_names(name):
    assert is_name(name)
    assert is_pattern(name)
    assert not has_wildcard(name)


@pytest.mark.parametrize(
    "text",
    ["", ".", "a.", ".a", "a..b", "a b", "é", "room.*", "room.>", "*", ">", "x" * 129, "a\n"],
)
def test_not_names(text):
    assert not is_name(text)


@pytest.mark.parametrize("pattern", ["room.*", "*", ">", "sensors.>", "*.temp", "a.*.c.>"])
def test_patterns(pattern):
    assert is_pattern(pattern)
    assert has_wildcard(pattern)


@pytest.mark.parametrize("text", ["a.>.b", ">.a", "a*", "a.b*", "a..*", "", "room.**"])
def test_not_patterns(text):
    assert not is_pattern(text)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("room.*", "room.42", True),
        ("room.*", "room.42.x", False),
        ("room.*", "room", False),
        ("sensors.>", "sensors.7", True),
        ("sensors.>", "sensors.7.temp", True),
        ("sensors.>", "sensors", False),
        (">", "anything.at.all", True),
        ("*", "one", True),
        ("*", "one.two", False),
        ("*.temp", "7.temp", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("main", "main", True),
        ("main", "main.x", False),
    ],
)
def test_matching(pattern, name, expected):
    assert matches(pattern, name) is expected


TOKENS = st.sampled_from(["a", "b", "c", "42"])
NAMES = st.lists(TOKENS, min_size=1, max_size=4).map(".".join)
PATTERNS = st.builds(
    lambda tokens, tail: ".".join(tokens + ([">"] if tail else [])),
    st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=4),
    st.booleans(),
).filter(bool)


def _reference(pattern: str, name: str) -> bool:
    """Matching written another way: token lists compared recursively."""

    def go(p: list[str], n: list[str]) -> bool:
        if not p:
            return not n
        if p[0] == ">":
            return len(n) >= 1
        return bool(n) and (p[0] in ("*", n[0])) and go(p[1:], n[1:])

    return go(pattern.split("."), name.split("."))


@settings(max_examples=300, deadline=None)
@given(PATTERNS, NAMES)
def test_matching_agrees_with_a_reference(pattern, name):
    assert is_pattern(pattern)
    assert matches(pattern, name) is _reference(pattern, name)


@settings(max_examples=100, deadline=None)
@given(st.lists(PATTERNS, max_size=6, unique=True), st.lists(NAMES, min_size=1, max_size=6))
def test_the_index_finds_exactly_the_matching_patterns(patterns, names):
    index = PatternIndex(cache_size=3)
    for pattern in patterns:
        index.add(pattern)
    for name in names + names:  # twice: the second time from the cache
        assert set(index.matching(name)) == {p for p in patterns if matches(p, name)}
    for pattern in patterns[:2]:
        index.discard(pattern)
    for name in names:
        assert set(index.matching(name)) == {p for p in patterns[2:] if matches(p, name)}
