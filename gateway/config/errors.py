"""The one error a configuration problem raises."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one line shown to the user.

    For example ``config.toml: listeners[1].port: expected an integer 0-65535, got "80a"``.
    """

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + problem)
