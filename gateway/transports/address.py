"""Readable forms of network addresses for logs and peer listings."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress


def host_port(host: str, port: int) -> str:
    """``127.0.0.1:8006`` or ``[::1]:8006``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(address: IAddress) -> str:
    """An address as ``host:port`` when it has them, else its own text form."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return host_port(host, port)
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode() if isinstance(name, bytes) else str(name)
    return str(address)
