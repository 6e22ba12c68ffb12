"""Where clients connect: the URL schemes of ``gateway bench``, and its usage error."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

SCHEMES = ("tcp", "tls", "udp", "dtls", "ws", "wss", "nats", "nats+ws")
STREAM_SCHEMES = ("tcp", "tls", "ws", "wss", "nats", "nats+ws")
DATAGRAM_SCHEMES = ("udp", "dtls")
FRAMINGS = ("lines", "u16", "u32")
"""What ``?framing=`` may ask of a tcp:// or tls:// subscriber (the listener's ``framing``)."""


class BenchError(Exception):
    """A usage or setup problem; ``str()`` is the message."""


@dataclass(frozen=True)
class Target:
    """Where and how a client connects, from a URL such as ``ws://127.0.0.1:8080/ws``
    (``tcp://HOST:PORT?framing=u32``: length-prefixed messages instead of lines)."""

    scheme: str
    host: str
    port: int
    path: str = "/"
    framing: str = "lines"

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise BenchError(
                f"unsupported URL {url!r}: expected " + ", ".join(f"{s}://" for s in SCHEMES)
            )
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise BenchError(f"bad URL {url!r}: expected {parts.scheme}://HOST:PORT")
        path = parts.path or ("/" if parts.scheme == "nats+ws" else "/ws")
        framing = parse_qs(parts.query).get("framing", ["lines"])[-1]
        if framing not in FRAMINGS or (framing != "lines" and parts.scheme not in ("tcp", "tls")):
            raise BenchError(
                f"bad URL {url!r}: ?framing= takes {', '.join(FRAMINGS)}, on tcp:// and tls://"
            )
        return cls(parts.scheme, parts.hostname, port, path, framing)

    @property
    def transport(self) -> str:
        """What the report calls these subscribers: ``tcp``, or ``tcp-u32`` by framing."""
        return self.scheme if self.framing == "lines" else f"{self.scheme}-{self.framing}"

    @property
    def secure(self) -> bool:
        return self.scheme in ("tls", "wss")

    @property
    def datagram(self) -> bool:
        """Whether clients connect over UDP (udp, and dtls: DTLS 1.2 over UDP)."""
        return self.scheme in DATAGRAM_SCHEMES

    @property
    def lossy(self) -> bool:
        """Whether messages may be lost by design (no flow control): datagrams."""
        return self.datagram

    def __str__(self) -> str:
        path = self.path if self.scheme in ("ws", "wss", "nats+ws") else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?framing={self.framing}" if self.framing != "lines" else ""
        return f"{self.scheme}://{host}:{self.port}{path}{query}"
