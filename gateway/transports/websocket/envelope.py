"""The ``gateway.v1.json`` subprotocol, sans I/O: JSON envelopes in text frames.

Clients that negotiate it get each message as ``{"type":"message","from":...}``
naming its sender, plus welcome and join/leave events; what they send may be
such an envelope too (see docs/websocket.md).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from zope.interface import implementer

from gateway.core.interfaces import IFramer
from gateway.core.message import Batch, Kind
from gateway.transports.websocket.frames import (
    OPCODE_TEXT,
    count_frames,
    frame_header,
    frame_message,
)

JSON_SUBPROTOCOL = "gateway.v1.json"
"""The subprotocol of clients that want JSON envelopes and presence events."""


MAX_WELCOME_PEERS = 1000
"""At most this many entries in the ``peers`` list of a JSON welcome."""


_json_string = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@implementer(IFramer)
class JsonFramer:
    """Each payload as a JSON envelope in one text frame; a batch in one bytes object."""

    name = "websocket-json"

    def frame(self, batch: Batch) -> bytes:
        origin = batch.origin
        head = (
            '{"type":"message","from":'
            + _json_string(origin.peer_id)
            + ',"transport":'
            + _json_string(origin.transport)
            + ',"listener":'
            + _json_string(origin.listener)
            + ',"channel":'
            + _json_string(batch.channel)
        )
        if batch.history:
            head += ',"history":true'
        parts: list[bytes] = []
        kinds = batch.kinds if batch.kinds is not None else (None,) * len(batch.payloads)
        for payload, kind in zip(batch.payloads, kinds, strict=True):
            envelope = (head + _payload_field(payload, kind) + "}").encode("utf-8")
            parts.append(frame_header(len(envelope), OPCODE_TEXT))
            parts.append(envelope)
        return b"".join(parts)

    def count(self, wire: bytes) -> int:
        return count_frames(wire)


def _payload_field(payload: bytes, kind: Kind | None) -> str:
    if kind is not Kind.BINARY:
        try:
            return ',"text":' + _json_string(payload.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return ',"base64":"' + base64.b64encode(payload).decode("ascii") + '"'


JSON_FRAMER = JsonFramer()


def json_event(event: dict[str, Any]) -> bytes:
    """A JSON event (welcome, join, leave) as one text frame."""
    return frame_message(_json_string(event).encode("utf-8"), OPCODE_TEXT)


def parse_envelope(data: bytes) -> tuple[bytes, Kind] | None:
    """The payload of a ``{"type":"message",...}`` text frame, or None if it is not one."""
    if data.lstrip(b" \t\r\n")[:1] != b"{":
        return None
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(envelope, dict) or envelope.get("type") != "message":
        return None
    text = envelope.get("text")
    if isinstance(text, str):
        try:
            return text.encode("utf-8"), Kind.TEXT
        except UnicodeEncodeError:  # a lone surrogate written as \\udXXX
            return None
    encoded = envelope.get("base64")
    if isinstance(encoded, str):
        try:
            return base64.b64decode(encoded, validate=True), Kind.BINARY
        except (binascii.Error, ValueError):
            return None
    return None
