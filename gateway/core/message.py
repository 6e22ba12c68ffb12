"""What travels on the bus: a batch of messages from one sender."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence


class Kind(enum.Enum):
    """Whether a message is text (valid UTF-8) or binary."""

    TEXT = "text"
    BINARY = "binary"

    @classmethod
    def of(cls, payload: bytes) -> Kind:
        """The kind of untyped bytes: text when they are valid UTF-8."""
        if payload.isascii():
            return cls.TEXT
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return cls.BINARY
        return cls.TEXT


class Origin:
    """Who sent a message: made once per peer and shared by all its batches."""

    __slots__ = ("listener", "peer_id", "transport", "user")

    def __init__(
        self, peer_id: str, listener: str, transport: str, user: str | None = None
    ) -> None:
        self.peer_id = peer_id
        self.listener = listener
        self.transport = transport
        self.user = user  # who the peer signed in as; None: anonymous

    def __repr__(self) -> str:
        user = f", user={self.user!r}" if self.user is not None else ""
        return f"Origin({self.peer_id!r}, {self.listener!r}, {self.transport!r}{user})"


class Batch:
    """Messages from one sender on one channel, in the order sent.

    ``kinds`` is ``None`` for bytes from line and datagram transports, whose
    kind is defined by their content (see ``Kind.of``) and only worked out by
    the framers that need it. ``lines`` optionally holds the payloads already
    joined as newline-terminated lines, which line framers send unchanged.

    On a channel that keeps history, ``offset`` is the offset of the first
    message (the others follow one by one) and ``epoch`` the channel's epoch
    (``gateway.core.history``); otherwise they are 0 and None. The bus stamps
    them; nothing else changes a batch once published (history keeps its
    payloads as they are).
    """

    __slots__ = (
        "channel",
        "epoch",
        "history",
        "kinds",
        "lines",
        "offset",
        "origin",
        "payloads",
        "recovered",
    )

    def __init__(
        self,
        origin: Origin,
        channel: str,
        payloads: Sequence[bytes],
        kinds: Sequence[Kind] | None = None,
        lines: bytes | None = None,
        history: bool = False,
        offset: int = 0,
        epoch: str | None = None,
        recovered: bool = False,
    ) -> None:
        self.origin = origin
        self.channel = channel
        self.payloads = payloads
        self.kinds = kinds
        self.lines = lines
        # True for messages replayed from a channel's history to a peer that joined.
        self.history = history
        # Numbered by the channel's history: the first message's offset, and the epoch.
        self.offset = offset
        self.epoch = epoch
        # True for messages a JSON client missed and asked for (``since``): recovered.
        self.recovered = recovered

    def __len__(self) -> int:
        return len(self.payloads)

    def messages(self) -> Iterator[tuple[bytes, Kind]]:
        """Each payload with its kind."""
        if self.kinds is None:
            for payload in self.payloads:
                yield payload, Kind.of(payload)
        else:
            yield from zip(self.payloads, self.kinds, strict=True)

    def byte_count(self) -> int:
        """Total payload bytes in the batch."""
        return sum(map(len, self.payloads))
