"""What ``gateway client`` reads from standard input, and how it sends it.

Raw by default: each line (or, over TCP and TLS, the bytes as they come) is
sent unchanged. With ``--json`` (or ``--subscribe``), the client speaks the
JSON envelopes of docs/protocol.md: a line that is a JSON object is sent as it
is (a request), any other line as ``{"type":"message","text":...}``, and the
``--subscribe`` requests go first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from gateway.transports.envelopes import event


class Speech:
    """Raw lines, or JSON envelopes."""

    def __init__(
        self, json: bool = False, subscribe: Sequence[str] = (), sign_in: Sequence[str] = ()
    ) -> None:
        self.json = json or bool(subscribe)
        self.subscribe = list(subscribe)
        # ("token", TOKEN), ("jwt", JWT) or ("password", USER, PASSWORD): the first message.
        self.sign_in = tuple(sign_in)

    def opening(self) -> list[bytes]:
        """What to send once connected: the sign-in, then a ``subscribe`` request per
        ``--subscribe``."""
        first = []
        if self.sign_in:
            first.append(self._sign_in())
        return first + [
            event({"type": "subscribe", "channel": channel}) for channel in self.subscribe
        ]

    def _sign_in(self) -> bytes:
        method, *rest = self.sign_in
        if self.json:
            if method in ("token", "jwt"):
                return event({"type": "auth", method: rest[0]})
            return event({"type": "auth", "user": rest[0], "password": rest[1]})
        return " ".join(["AUTH", method, *rest]).encode("utf-8")

    def line(self, line: bytes) -> bytes:
        """One line of input as it is sent (without a newline)."""
        if not self.json:
            return line
        stripped = line.strip()
        if stripped.startswith(b"{"):
            return stripped
        return event({"type": "message", "text": line.decode("utf-8", "replace")})


class Stdin(Protocol):
    """Standard input: hands data to ``on_data`` and end of input to ``on_end``."""

    def __init__(self, on_data: Callable[[bytes], object], on_end: Callable[[], object]) -> None:
        self.on_data = on_data
        self.on_end = on_end

    def dataReceived(self, data: bytes) -> None:
        self.on_data(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.on_end()


class StdinLines(Protocol):
    """Standard input as lines: ``on_line`` per line (the last one even without a newline)."""

    def __init__(self, on_line: Callable[[bytes], object], on_end: Callable[[], object]) -> None:
        self.on_line = on_line
        self.on_end = on_end
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self.on_line(line)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._partial:
            self.on_line(self._partial)
            self._partial = b""
        self.on_end()
