"""How messages leave a UDP or DTLS listener: one datagram (or record) per message.

A framer's wire is ``(datagrams, too_large, reserved)``: what to send, and how
many messages were left out (too large for a datagram, or looking like a
control datagram, which would confuse UDP clients); the peer counts those.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from gateway.config.listeners import MAX_UDP_PAYLOAD
from gateway.core.interfaces import IFramer
from gateway.core.message import Batch
from gateway.transports.datagram.wire import is_control
from gateway.transports.envelopes import event, message_envelopes

Datagrams = tuple[list[bytes], int, int]


@implementer(IFramer)
class DatagramFramer:
    """One datagram per payload, minus those too large or reserved (counted)."""

    name = "datagram"

    def frame(self, batch: Batch) -> Datagrams | None:
        datagrams = [payload + b"\n" for payload in batch.payloads]
        if max(map(len, datagrams)) <= MAX_UDP_PAYLOAD and not any(map(is_control, datagrams)):
            return datagrams, 0, 0
        # A message that looked like a control datagram would confuse UDP clients.
        fitting = [d for d in datagrams if len(d) <= MAX_UDP_PAYLOAD]
        too_large = len(datagrams) - len(fitting)
        allowed = [d for d in fitting if not is_control(d)]
        return allowed, too_large, len(fitting) - len(allowed)

    def count(self, wire: Datagrams) -> int:
        return len(wire[0])


DATAGRAM_FRAMER = DatagramFramer()


def _fitting(datagrams: list[bytes]) -> Datagrams:
    fitting = [d for d in datagrams if len(d) <= MAX_UDP_PAYLOAD]
    return fitting, len(datagrams) - len(fitting), 0


@implementer(IFramer)
class JsonDatagramFramer:
    """Each message as a JSON envelope in a datagram of its own (``format = "json"``)."""

    name = "datagram-json"

    def frame(self, batch: Batch) -> Datagrams:
        return _fitting([envelope + b"\n" for envelope in message_envelopes(batch)])

    def count(self, wire: Datagrams) -> int:
        return len(wire[0])

    def event(self, fields: dict[str, Any]) -> Datagrams:
        return _fitting([event(fields) + b"\n"])


JSON_DATAGRAM_FRAMER = JsonDatagramFramer()
