"""A config reload: what a new file may change while running, and what needs a restart.

A listener keeps its identity (type, address, channel, echo, endpoint) until a
restart; its other keys, the limits, channel history sizes and TLS material
apply at once. ``[admin]``, ``[cluster]``, ``[history]`` and the gateway's name,
workers and log settings need a restart too.
"""

from __future__ import annotations

from dataclasses import replace

from gateway.config.listeners import ListenerConfig
from gateway.config.settings import Config

_IDENTITY = ("type", "host", "port", "channel", "echo", "endpoint")
_GATEWAY_RESTART = ("name", "workers", "log_level", "log_format")


def _same_identity(old: ListenerConfig, new: ListenerConfig) -> bool:
    return all(getattr(old, key, None) == getattr(new, key, None) for key in _IDENTITY)


def without_restart_changes(old: Config, new: Config) -> Config:
    """``new``, except where applying it would need a restart: there, ``old`` stays."""
    new_listeners = {listener.name: listener for listener in new.listeners}
    listeners = []
    for listener in old.listeners:
        candidate = new_listeners.get(listener.name)
        keep_new = candidate is not None and _same_identity(listener, candidate)
        listeners.append(candidate if keep_new and candidate is not None else listener)
    gateway = replace(new.gateway, **{key: getattr(old.gateway, key) for key in _GATEWAY_RESTART})
    return replace(
        new,
        listeners=tuple(listeners),
        admin=old.admin,
        cluster=old.cluster,
        history=old.history,
        gateway=gateway,
    )


def restart_needed(old: Config, new: Config) -> list[str]:
    """What differs between ``old`` and ``new`` that only a restart can apply."""
    changes = []
    old_listeners = {listener.name: listener for listener in old.listeners}
    new_listeners = {listener.name: listener for listener in new.listeners}
    for name in sorted(set(old_listeners) - set(new_listeners)):
        changes.append(f'removing listener "{name}"')
    for name in sorted(set(new_listeners) - set(old_listeners)):
        changes.append(f'adding listener "{name}"')
    for name in sorted(set(old_listeners) & set(new_listeners)):
        before, after = old_listeners[name], new_listeners[name]
        for key in _IDENTITY:
            if getattr(before, key, None) != getattr(after, key, None):
                changes.append(f'listener "{name}" {key}')
    if old.admin != new.admin:
        changes.append("[admin]")
    if old.cluster != new.cluster:
        changes.append("[cluster]")
    if old.history != new.history:
        changes.append("[history]")
    for key in _GATEWAY_RESTART:
        if getattr(old.gateway, key) != getattr(new.gateway, key):
            changes.append(f"gateway.{key}")
    return changes
