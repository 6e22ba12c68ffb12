"""WebSocket server frames (RFC 6455), sans I/O: built once per batch, the same bytes for every receiver.

Server frames are unmasked and, with no extensions negotiated, identical for
every connection, so a batch is framed once and written to every receiver.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from zope.interface import implementer

from gateway.core.interfaces import IFramer
from gateway.core.message import Batch, Kind

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

_FIN = 0x80
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_OPCODES = {Kind.TEXT: OPCODE_TEXT, Kind.BINARY: OPCODE_BINARY}
# The headers of short frames (under 126 payload bytes), made once: most messages are short.
_SHORT_TEXT = tuple(_SHORT.pack(_FIN | OPCODE_TEXT, length) for length in range(126))
_SHORT_BINARY = tuple(_SHORT.pack(_FIN | OPCODE_BINARY, length) for length in range(126))


def frame_header(length: int, opcode: int) -> bytes:
    """The header of one unfragmented, unmasked server frame of ``length`` payload bytes."""
    if length < 126:
        return _SHORT.pack(_FIN | opcode, length)
    if length < 65536:
        return _MEDIUM.pack(_FIN | opcode, 126, length)
    return _LONG.pack(_FIN | opcode, 127, length)


def frame_message(payload: bytes, opcode: int) -> bytes:
    """One whole message as a single server frame (RFC 6455 section 5.2)."""
    return frame_header(len(payload), opcode) + payload


def count_frames(wire: bytes) -> int:
    """How many frames ``wire`` (whole unmasked server frames, as framers make them) holds."""
    count = 0
    offset = 0
    end = len(wire)
    while offset < end:
        length = wire[offset + 1] & 0x7F
        if length == 126:
            offset += 4 + _MEDIUM.unpack_from(wire, offset)[2]
        elif length == 127:
            offset += 10 + _LONG.unpack_from(wire, offset)[2]
        else:
            offset += 2 + length
        count += 1
    return count


def _text_frames(payloads: Sequence[bytes]) -> bytes:
    """Each payload as one text frame (all known to be text), in one bytes object."""
    if len(payloads) == 1:
        payload = payloads[0]
        return frame_header(len(payload), OPCODE_TEXT) + payload
    short = _SHORT_TEXT
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        length = len(payload)
        append(short[length] if length < 126 else frame_header(length, OPCODE_TEXT))
        append(payload)
    return b"".join(parts)


@implementer(IFramer)
class RawFramer:
    """Each payload as one frame, text or binary by its kind; a batch in one bytes object."""

    name = "websocket"

    def frame(self, batch: Batch) -> bytes:
        payloads = batch.payloads
        kinds = batch.kinds
        if kinds is None and batch.lines is not None and batch.lines.isascii():
            return _text_frames(payloads)
        if len(payloads) == 1:
            payload = payloads[0]
            kind = kinds[0] if kinds is not None else Kind.of(payload)
            return frame_header(len(payload), _OPCODES[kind]) + payload
        parts: list[bytes] = []
        append = parts.append
        messages = batch.messages() if kinds is None else zip(payloads, kinds, strict=True)
        for payload, kind in messages:
            length = len(payload)
            if length < 126:
                append((_SHORT_TEXT if kind is Kind.TEXT else _SHORT_BINARY)[length])
            else:
                append(frame_header(length, _OPCODES[kind]))
            append(payload)
        return b"".join(parts)

    def count(self, wire: bytes) -> int:
        return count_frames(wire)


RAW_FRAMER = RawFramer()
