"""Roles and what they allow: publish and subscribe permissions by channel pattern.

A role (``[roles.NAME]``) lists patterns (the channels' wildcards) under
``publish``, ``subscribe``, ``deny_publish`` and ``deny_subscribe``. ``{user}``
in a pattern stands for the signed-in user's name; a name holding ``.``, ``*``
or ``>`` (or no user at all) never matches such a pattern. A peer's
``Permissions`` join its roles: the union of their allows and of their denies.
Deny beats allow, and what no allow matches is denied, so a role with empty
lists allows nothing.

- publish to a channel: an allow matches it and no deny does;
- subscribe to a name or pattern: an allow *covers* it (every channel it
  matches is allowed) and no deny covers it;
- receive through a subscription: a message on a channel a deny matches is
  never delivered, whatever wildcard subscription would take it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.core.channels import covers, is_pattern, matches

USER = "{user}"
LISTS = ("publish", "subscribe", "deny_publish", "deny_subscribe")


@dataclass(frozen=True)
class Role:
    """One ``[roles.NAME]`` table: four lists of patterns, ``{user}`` left in."""

    name: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    deny_publish: tuple[str, ...] = ()
    deny_subscribe: tuple[str, ...] = ()


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` cannot be in a role (None when it can): a channel pattern, where
    ``{user}`` may stand in for a whole token or part of one."""
    if not is_pattern(pattern.replace(USER, "u")):
        return "not a channel name or pattern"
    return None


def _for_user(patterns: Iterable[str], user: str | None) -> tuple[str, ...]:
    """``patterns`` with ``{user}`` filled in; those that cannot match ``user`` left out."""
    usable = user is not None and user != "" and not any(c in user for c in ".*>")
    out = []
    for pattern in patterns:
        if USER not in pattern:
            out.append(pattern)
        elif usable:
            assert user is not None
            filled = pattern.replace(USER, user)
            if is_pattern(filled):  # a name may hold characters no channel does
                out.append(filled)
    return tuple(out)


class Permissions:
    """What one user with some roles may do; answers are cached per channel.

    The cache holds at most ``cache_size`` channels per kind of question and is
    emptied when full: permissions cost a dict lookup per batch.
    """

    __slots__ = (
        "_cache_size",
        "_publish",
        "_receive",
        "deny_publish",
        "deny_subscribe",
        "publish",
        "roles",
        "subscribe",
        "user",
    )

    def __init__(self, roles: Iterable[Role], user: str | None, cache_size: int = 10_000) -> None:
        self.roles = tuple(roles)
        self.user = user
        self.publish = _for_user((p for r in self.roles for p in r.publish), user)
        self.subscribe = _for_user((p for r in self.roles for p in r.subscribe), user)
        self.deny_publish = _for_user((p for r in self.roles for p in r.deny_publish), user)
        self.deny_subscribe = _for_user((p for r in self.roles for p in r.deny_subscribe), user)
        self._cache_size = cache_size
        self._publish: dict[str, bool] = {}
        self._receive: dict[str, bool] = {}

    def may_publish(self, channel: str) -> bool:
        """Whether a message to the name ``channel`` may be relayed."""
        allowed = self._publish.get(channel)
        if allowed is None:
            allowed = any(matches(p, channel) for p in self.publish) and not any(
                matches(p, channel) for p in self.deny_publish
            )
            if len(self._publish) >= self._cache_size:
                self._publish.clear()
            self._publish[channel] = allowed
        return allowed

    def may_subscribe(self, pattern: str) -> bool:
        """Whether a subscription to the name or pattern ``pattern`` may be made."""
        return any(covers(p, pattern) for p in self.subscribe) and not any(
            covers(p, pattern) for p in self.deny_subscribe
        )

    def may_receive(self, channel: str) -> bool:
        """Whether a message on the name ``channel`` may be delivered (through any
        subscription the peer holds: those were allowed when made)."""
        if not self.deny_subscribe:
            return True
        allowed = self._receive.get(channel)
        if allowed is None:
            allowed = not any(matches(p, channel) for p in self.deny_subscribe)
            if len(self._receive) >= self._cache_size:
                self._receive.clear()
            self._receive[channel] = allowed
        return allowed


class Access:
    """The roles in force (replaced on a reload) and the permissions made of them.

    Peers that did not sign in share one ``Permissions`` per role, so they
    share its cache too.
    """

    def __init__(self, roles: Mapping[str, Role], cache_size: int = 10_000) -> None:
        self.cache_size = cache_size
        self.update(roles)

    def update(self, roles: Mapping[str, Role]) -> None:
        self.roles = dict(roles)
        self._anonymous: dict[str, Permissions] = {}

    def anonymous(self, role: str | None) -> Permissions | None:
        """The permissions of a peer of a listener with ``anonymous_role = role``
        that did not sign in; None (anything goes) for an open listener."""
        if role is None:
            return None
        permissions = self._anonymous.get(role)
        if permissions is None:
            found = self.roles.get(role)
            roles = () if found is None else (found,)  # a role gone: nothing is allowed
            permissions = self._anonymous[role] = Permissions(roles, None, self.cache_size)
        return permissions

    def for_user(self, user: str, roles: Iterable[str]) -> Permissions:
        """The permissions of ``user`` signed in with ``roles`` (names; unknown ones count
        for nothing)."""
        found = [self.roles[name] for name in roles if name in self.roles]
        return Permissions(found, user, self.cache_size)
