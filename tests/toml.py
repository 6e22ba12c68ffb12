"""TOML text for gateway configurations: tables and ``[[listeners]]`` entries (the tests'
and the benchmark suite's)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TomlValue", "toml_listener", "toml_table"]

TomlValue = str | int | float | bool | Path | list[str]
"""What ``toml_table`` and ``toml_listener`` write: JSON's strings, numbers, booleans and
arrays are TOML's too (a ``Path`` is written as a string)."""


def toml_table(header: str, /, **settings: TomlValue | None) -> str:
    """A TOML table: ``toml_table("limits", idle_timeout=1)`` is ``[limits]``, then
    ``idle_timeout = 1``. A setting given as ``None`` is left out."""
    lines = [
        f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}\n"
        for key, value in settings.items()
        if value is not None
    ]
    return f"\n[{header}]\n" + "".join(lines)


def toml_listener(
    name: str,
    kind: str | None = None,
    /,
    *,
    port: int | None = 0,
    certs: Path | str | None = None,
    **settings: TomlValue | None,
) -> str:
    """One ``[[listeners]]`` table named ``name``, of type ``kind`` (default: the name).

    ``port`` 0 (any free port) unless given; ``None`` for none (an ``endpoint`` listener).
    ``certs``: the folder whose ``server.pem`` and ``server.key`` are its ``cert`` and ``key``.
    """
    head: dict[str, TomlValue | None] = {"name": name, "type": kind or name}
    if port is not None:
        head["port"] = port
    if certs is not None:
        head.update(cert=f"{certs}/server.pem", key=f"{certs}/server.key")
    return toml_table("[listeners]", **head, **settings)
