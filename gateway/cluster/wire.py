"""The backplane's wire format: batches and presence events as msgpack arrays (see docs/scaling.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import msgpack

from gateway.core.message import Batch, Kind, Origin

WIRE_VERSION = 1
MESSAGE = 0
JOIN = 1
LEAVE = 2
_EVENT_TYPES = {"join": JOIN, "leave": LEAVE}
EVENT_NAMES = {JOIN: "join", LEAVE: "leave"}
KIND_CODES = {Kind.TEXT: ord("t"), Kind.BINARY: ord("b")}
KINDS_BY_CODE = {code: kind for kind, code in KIND_CODES.items()}


class WireError(ValueError):
    """Bytes on a gateway Redis channel that are not a frame this version reads."""


class Frame(NamedTuple):
    """One decoded publication of another node."""

    type: int  # MESSAGE, JOIN or LEAVE
    node: str
    channel: str
    peer_id: str
    listener: str
    transport: str
    kinds: tuple[Kind, ...] | None = None  # None: untyped bytes (line and datagram transports)
    payloads: Sequence[bytes] = ()
    lines: bytes | None = None  # the payloads as newline-terminated lines, when sent that way
    user: str | None = None  # who the sender signed in as


def encode_batch(node: str, batch: Batch) -> bytes:
    """A batch as one msgpack array (see docs/scaling.md, "Wire format").

    ``[1, 0, node, channel, peer, listener, transport, kinds, body, user]``:
    ``kinds`` is nil for untyped bytes or one byte per message (``t`` text,
    ``b`` binary); ``body`` is the line transports' newline-terminated bytes
    as they were read, or an array of payloads; ``user`` is who the sender
    signed in as, nil for an anonymous one (frames without it are anonymous).
    """
    origin = batch.origin
    kinds = None if batch.kinds is None else bytes(KIND_CODES[kind] for kind in batch.kinds)
    body: bytes | Sequence[bytes] = batch.lines if batch.lines is not None else batch.payloads
    packed: bytes = msgpack.packb(
        (
            WIRE_VERSION,
            MESSAGE,
            node,
            batch.channel,
            origin.peer_id,
            origin.listener,
            origin.transport,
            kinds,
            body,
            origin.user,
        ),
        use_bin_type=True,
    )
    return packed


def encode_presence(node: str, event: str, origin: Origin, channel: str) -> bytes:
    """A join or leave as ``[1, 1 or 2, node, channel, peer, listener, transport]``."""
    packed: bytes = msgpack.packb(
        (
            WIRE_VERSION,
            _EVENT_TYPES[event],
            node,
            channel,
            origin.peer_id,
            origin.listener,
            origin.transport,
        ),
        use_bin_type=True,
    )
    return packed


def decode(data: bytes) -> Frame:
    """The frame in ``data``; raises ``WireError`` for anything else."""
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError(f"not msgpack: {e}") from None
    if not isinstance(fields, tuple) or len(fields) < 7 or fields[0] != WIRE_VERSION:
        raise WireError("not a version 1 gateway frame")
    kind = fields[1]
    strings = fields[2:7]
    if not all(isinstance(s, str) for s in strings):
        raise WireError("bad origin fields")
    node, channel, peer_id, listener, transport = strings
    if kind in EVENT_NAMES:
        return Frame(kind, node, channel, peer_id, listener, transport)
    if kind != MESSAGE or len(fields) not in (9, 10):
        raise WireError(f"unknown frame type {kind!r}")
    codes, body = fields[7], fields[8]
    user = fields[9] if len(fields) == 10 else None
    if user is not None and not isinstance(user, str):
        raise WireError("bad user")
    kinds: tuple[Kind, ...] | None = None
    if codes is not None:
        if not isinstance(codes, bytes):
            raise WireError("bad kinds")
        try:
            kinds = tuple(KINDS_BY_CODE[code] for code in codes)
        except KeyError:
            raise WireError("bad kinds") from None
    if isinstance(body, bytes):
        if kinds is not None or not body.endswith(b"\n"):
            raise WireError("bad lines")
        payloads = body.split(b"\n")
        payloads.pop()
        return Frame(kind, node, channel, peer_id, listener, transport, None, payloads, body, user)
    if not isinstance(body, tuple) or not all(isinstance(p, bytes) for p in body):
        raise WireError("bad payloads")
    if kinds is not None and len(kinds) != len(body):
        raise WireError("kinds and payloads differ in length")
    return Frame(kind, node, channel, peer_id, listener, transport, kinds, body, None, user)


def remote_origin(frame: Frame) -> Origin:
    """Who sent ``frame``: its peer id qualified by its node, e.g. ``tcp-3@gw-b``."""
    return Origin(f"{frame.peer_id}@{frame.node}", frame.listener, frame.transport, frame.user)
