"""The ``gateway.v1.json`` subprotocol over WebSocket: each JSON envelope in one text frame.

The envelopes themselves are the same on every transport
(``gateway.transports.envelopes``); here they only get their frames.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from gateway.core.interfaces import IFramer
from gateway.core.message import Batch
from gateway.transports.envelopes import event, message_envelopes
from gateway.transports.websocket.frames import (
    OPCODE_TEXT,
    count_frames,
    frame_header,
    frame_message,
)

JSON_SUBPROTOCOL = "gateway.v1.json"
"""The subprotocol of clients that want JSON envelopes and presence events."""


@implementer(IFramer)
class JsonFramer:
    """Each payload as a JSON envelope in one text frame; a batch in one bytes object."""

    name = "websocket-json"

    def frame(self, batch: Batch) -> bytes:
        parts: list[bytes] = []
        for envelope in message_envelopes(batch):
            parts.append(frame_header(len(envelope), OPCODE_TEXT))
            parts.append(envelope)
        return b"".join(parts)

    def count(self, wire: bytes) -> int:
        return count_frames(wire)

    def event(self, fields: dict[str, Any]) -> bytes:
        return json_event(fields)


JSON_FRAMER = JsonFramer()


def json_event(fields: dict[str, Any]) -> bytes:
    """A JSON event (welcome, join, leave, error, ...) as one text frame."""
    return frame_message(event(fields), OPCODE_TEXT)
