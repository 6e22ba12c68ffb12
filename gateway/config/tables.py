"""Reading TOML tables: typed values, and one-line errors that name the file and key."""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from gateway.config.errors import ConfigError


def show(value: object) -> str:
    """A value as the user wrote it in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


class Table:
    """One TOML table being read."""

    def __init__(self, file: str, where: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.where = where
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for name in self.data:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                known = ", ".join(allowed)
                raise self.error(name, f"unknown key{hint}; known keys: {known}")

    def string(
        self,
        name: str,
        default: str | None = None,
        pattern: re.Pattern[str] | None = None,
        what: str = "a string",
    ) -> str:
        if name not in self.data:
            if default is None:
                raise self.error(name, "missing (required)")
            return default
        value = self.data[name]
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise self.error(name, f"expected {what}, got {show(value)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {show(value)}")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int | None = None) -> int:
        if name not in self.data:
            if default is None:
                raise self.error(name, "missing (required)")
            return default
        value = self.data[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            bound = f"{low}-{high}" if high is not None else f">= {low}"
            raise self.error(name, f"expected an integer {bound}, got {show(value)}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.data.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.error(
                name, f"expected a number of seconds {low:g}-{high:g}, got {show(value)}"
            )
        return float(value)

    def table(self, name: str) -> Table:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {show(value)}")
        return Table(self.file, self.key(name), value)

    def host(self) -> str:
        """The ``host`` key: an IP address (default 127.0.0.1)."""
        host = self.string("host", "127.0.0.1", what="an IP address")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            raise self.error(
                "host",
                f'expected an IP address such as "127.0.0.1", "::" or "0.0.0.0", got {show(host)}',
            ) from None

    def path(self, name: str, base: Path, required: bool) -> Path | None:
        """A file path, relative to the config file's folder."""
        if name not in self.data and not required:
            return None
        value = self.string(name, what="a file path")
        if not value:
            raise self.error(name, "expected a file path, got an empty string")
        return base / Path(value).expanduser()

    def networks(
        self, name: str, default: tuple[str, ...]
    ) -> tuple[IPv4Network | IPv6Network, ...]:
        value = self.data.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(
                name, f'expected a list of networks such as ["127.0.0.0/8"], got {show(value)}'
            )
        networks = []
        for text in value:
            try:
                networks.append(ip_network(text, strict=False))
            except ValueError:
                raise self.error(
                    name,
                    f'expected networks in CIDR form such as "10.0.0.0/8" or "::1/128", got {show(text)}',
                ) from None
        return tuple(networks)
