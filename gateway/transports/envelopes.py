"""The JSON envelopes (``gateway.v1.json``), sans I/O, the same on every transport.

Gateway → client: ``message`` events (one per message, naming sender and
channel), ``welcome``, ``join``/``leave``, ``subscribed``/``unsubscribed`` and
``error``. Client → gateway: ``subscribe``, ``unsubscribe`` and ``message``
requests; anything else a JSON client sends is relayed as raw text, as before
requests existed. Each transport wraps these bytes its own way: a WebSocket
text frame, a line ending in ``\\n``, one datagram. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from gateway.core.channels import has_wildcard, is_name
from gateway.core.message import Batch, Kind

REQUESTS = ("subscribe", "unsubscribe", "message")
ERROR_CODES = {
    "bad_request": "the request is malformed (wrong type of a field, a message without text or base64, a bad since)",
    "bad_channel": "the channel is missing, not a name (or pattern, to subscribe), or a pattern to publish to",
    "too_many_subscriptions": "the peer has max_subscriptions subscriptions already",
    "too_many_channels": "the gateway has max_channels names and patterns in use already",
    "not_subscribed": "unsubscribing from what the peer is not subscribed to",
    "forbidden": "the peer's role does not allow publishing to (or subscribing to) that channel",
}
"""Every ``code`` an ``error`` event may carry, and when."""

compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""JSON text of a value, without spaces, not escaping non-ASCII text."""


def event(fields: dict[str, Any]) -> bytes:
    """A gateway → client event as UTF-8 JSON bytes."""
    return compact(fields).encode("utf-8")


def message_envelopes(batch: Batch) -> list[bytes]:
    """One ``message`` event per message of ``batch``, as UTF-8 JSON bytes."""
    if batch.epoch is not None:
        return _numbered_envelopes(batch, batch.epoch)
    verbatim = verbatim_envelopes(batch)
    if verbatim is not None:
        head, tail = verbatim
        return [head + payload + tail for payload in batch.payloads]
    text = _message_head(batch)
    kinds = batch.kinds if batch.kinds is not None else (None,) * len(batch.payloads)
    return [
        (text + _payload_field(payload, kind) + "}").encode("utf-8")
        for payload, kind in zip(batch.payloads, kinds, strict=True)
    ]


def _numbered_envelopes(batch: Batch, epoch: str) -> list[bytes]:
    """The ``message`` events of a batch of a channel that keeps history: each with its
    ``offset`` (the batch's first, then one more per message) and the ``epoch``."""
    offsets = range(batch.offset, batch.offset + len(batch.payloads))
    head = _message_head(batch) + ',"offset":'
    tail = ',"epoch":' + compact(epoch)
    if _verbatim(batch):
        # One formatting per message; a literal % of the head (a user name) doubled.
        template = head.replace("%", "%%") + "%d" + tail.replace("%", "%%") + ',"text":"%b"}'
        encoded = template.encode("utf-8")
        return [encoded % pair for pair in zip(offsets, batch.payloads, strict=True)]
    kinds = batch.kinds if batch.kinds is not None else (None,) * len(batch.payloads)
    return [
        (head + str(offset) + tail + _payload_field(payload, kind) + "}").encode("utf-8")
        for offset, payload, kind in zip(offsets, batch.payloads, kinds, strict=True)
    ]


_ESCAPED = bytes(range(0x20)) + b'"\\'
"""The bytes a JSON string escapes (``ensure_ascii=False``): all else goes in as it is."""


def verbatim_envelopes(batch: Batch) -> tuple[bytes, bytes] | None:
    """``(head, tail)`` such that ``head + payload + tail`` is the ``message`` event of
    each payload of ``batch`` (what ``message_envelopes`` makes), or None.

    The common case: text that JSON takes as it is (valid UTF-8 with nothing to
    escape), on a channel that keeps no history (whose messages each have an
    offset of their own). Then a framer joins a whole batch in one call instead
    of encoding each message.
    """
    if batch.epoch is not None or not _verbatim(batch):
        return None
    return (_message_head(batch) + ',"text":"').encode("utf-8"), b'"}'


def _verbatim(batch: Batch) -> bool:
    """Whether every payload of ``batch`` is text that JSON takes as it is."""
    kinds = batch.kinds
    if kinds is not None and Kind.BINARY in kinds:
        return False
    payloads = batch.payloads
    # An ASCII byte between payloads: then valid UTF-8 as a whole means each is.
    body = payloads[0] if len(payloads) == 1 else b" ".join(payloads)
    if len(body.translate(None, _ESCAPED)) != len(body):  # C speed, unlike a regex search
        return False
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _message_head(batch: Batch) -> str:
    """A ``message`` event of ``batch`` up to its payload's field."""
    origin = batch.origin
    head = (
        '{"type":"message","from":'
        + compact(origin.peer_id)
        + ',"transport":'
        + compact(origin.transport)
        + ',"listener":'
        + compact(origin.listener)
        + ',"channel":'
        + compact(batch.channel)
    )
    if origin.user is not None:
        head += ',"user":' + compact(origin.user)
    if batch.history:
        head += ',"history":true'
    if batch.recovered:
        head += ',"recovered":true'
    return head


def _payload_field(payload: bytes, kind: Kind | None) -> str:
    if kind is not Kind.BINARY:
        try:
            return ',"text":' + compact(payload.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return ',"base64":"' + base64.b64encode(payload).decode("ascii") + '"'


_PLAIN = rb'\{"type":"message","channel":"([^"\\\x00-\x1f]+)","text":"([^"\\\x00-\x1f]*)"\}'
_PLAIN_MESSAGE = re.compile(_PLAIN)
_PLAIN_LINES = re.compile(rb"^" + _PLAIN + rb"\r?$", re.MULTILINE)


def plain_message(data: bytes) -> tuple[str, bytes] | None:
    """``(channel, payload)`` when ``data`` is a plain ``message`` request, else None.

    Plain: exactly ``{"type":"message","channel":"NAME","text":"TEXT"}`` with
    nothing to unescape in TEXT, the form clients send most. What
    ``parse_request`` makes of such a request, without building it; anything
    else (another order of fields, an ``id``, escapes) goes the long way.
    """
    match = _PLAIN_MESSAGE.fullmatch(data)
    if match is None:
        return None
    name, text = match.groups()
    if not _utf8(data):
        return None
    channel = name.decode("utf-8")
    return (channel, text) if is_name(channel) else None


def plain_message_runs(chunk: bytes, count: int) -> list[tuple[str, list[bytes]]] | None:
    """The runs of messages to one channel each when every one of the ``count`` lines of
    ``chunk`` is a plain ``message`` request (see ``plain_message``), else None.

    One regex call for a whole read of a JSON-lines client instead of one JSON
    parse per line. Lines cannot share a match (no newline fits in one), so as
    many matches as lines means every line is plain.
    """
    found = _PLAIN_LINES.findall(chunk)
    if len(found) != count or not _utf8(chunk):
        return None
    runs: list[tuple[str, list[bytes]]] = []
    last = None
    payloads: list[bytes] = []
    for name, text in found:
        if name != last:
            channel = name.decode("utf-8")
            if not is_name(channel):
                return None
            last = name
            payloads = []
            runs.append((channel, payloads))
        payloads.append(text)
    return runs


def _utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Request:
    """A client request: ``type`` is one of ``REQUESTS``."""

    __slots__ = ("channel", "fields", "kind", "payload", "since", "type")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.type: str = fields["type"]
        self.channel: str | None = None
        self.payload = b""
        self.kind = Kind.TEXT
        # A subscribe's ``since``: (offset, epoch) of the last message the client had.
        self.since: tuple[int, str] | None = None

    def answer(self, **fields: Any) -> dict[str, Any]:
        """An answer event, carrying the request's ``id`` when it had one."""
        if "id" in self.fields:
            fields["id"] = self.fields["id"]
        return fields


class RequestError(Exception):
    """A request of a known type that is invalid: becomes an ``error`` event."""

    def __init__(self, request: Request, code: str, reason: str) -> None:
        super().__init__(reason)
        self.event = request.answer(type="error", code=code, reason=reason)


def parse_request(data: bytes) -> Request | None:
    """The request ``data`` is, or None when it is no request (then it is relayed as it is).

    Raises ``RequestError`` for a request of a known type that is invalid.
    """
    if data.lstrip(b" \t\r\n")[:1] != b"{":
        return None
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or fields.get("type") not in REQUESTS:
        return None
    request = Request(fields)
    ident = fields.get("id")
    if "id" in fields and (isinstance(ident, bool) or not isinstance(ident, str | int)):
        del fields["id"]
        raise RequestError(request, "bad_request", '"id" must be a string or an integer')
    channel = fields.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise RequestError(request, "bad_channel", '"channel" must be a string')
    request.channel = channel
    if request.type == "message":
        _payload(request)
        if channel is not None and not is_name(channel):
            raise RequestError(request, "bad_channel", f"cannot publish to {channel!r}")
    elif channel is None:
        raise RequestError(request, "bad_channel", f'{request.type} needs a "channel"')
    elif request.type == "subscribe" and "since" in fields:
        request.since = _since(request, channel)
    return request


def _since(request: Request, channel: str) -> tuple[int, str]:
    """A subscribe's ``"since":{"offset":17,"epoch":"..."}``: where the client left off."""
    since = request.fields["since"]
    if not isinstance(since, dict):
        raise RequestError(request, "bad_request", '"since" must be an object')
    offset, epoch = since.get("offset"), since.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise RequestError(request, "bad_request", '"since" needs "offset": an integer >= 0')
    if not isinstance(epoch, str):
        raise RequestError(request, "bad_request", '"since" needs "epoch": a string')
    if has_wildcard(channel):
        raise RequestError(request, "bad_request", '"since" needs a channel name, not a pattern')
    return offset, epoch


def _payload(request: Request) -> None:
    text = request.fields.get("text")
    if isinstance(text, str):
        try:
            request.payload = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate written as \\udXXX
            raise RequestError(request, "bad_request", '"text" is not valid Unicode') from None
        return
    encoded = request.fields.get("base64")
    if isinstance(encoded, str):
        try:
            request.payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(request, "bad_request", '"base64" is not valid base64') from None
        request.kind = Kind.BINARY
        return
    raise RequestError(request, "bad_request", 'a message needs "text" or "base64"')
