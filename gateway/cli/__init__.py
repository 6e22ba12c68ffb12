"""The ``gateway`` command (``main``) and its terminal client (``client``).

The only package that touches the global reactor.
"""

from __future__ import annotations

from gateway.cli.main import main

__all__ = ["main"]
