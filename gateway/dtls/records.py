"""DTLS record framing: which bytes are whole records, and what goes in one datagram.

A DTLS record (RFC 6347 4.1) is a 13-byte header (content type, version,
epoch, sequence number, length) and its fragment; a datagram holds whole
records, never part of one. pyOpenSSL's memory BIOs are byte streams, so the
datagrams OpenSSL writes come out joined: ``pack`` cuts them apart again
(records whole, each datagram at most the MTU), and ``split`` tells a datagram
of whole records from a truncated one.
"""

from __future__ import annotations

from collections.abc import Iterable

HEADER_BYTES = 13
HANDSHAKE = 22
CLIENT_HELLO = 1
DTLS_MAJOR = 0xFE
"""The first version byte of every DTLS record (DTLS 1.0 is 0xFEFF, 1.2 is 0xFEFD)."""


def split(data: bytes) -> list[bytes] | None:
    """The records ``data`` holds, or None unless it is whole DTLS records and nothing else."""
    records: list[bytes] = []
    at = 0
    while at < len(data):
        if len(data) - at < HEADER_BYTES or data[at + 1] != DTLS_MAJOR:
            return None
        end = at + HEADER_BYTES + int.from_bytes(data[at + 11 : at + 13], "big")
        if end > len(data):
            return None
        records.append(data[at:end])
        at = end
    return records


def pack(records: Iterable[bytes], mtu: int) -> list[bytes]:
    """``records`` in order, joined into as few datagrams of at most ``mtu`` bytes as fit.

    A record longer than ``mtu`` goes alone in a datagram of its own (OpenSSL
    keeps its records under the MTU it was given, so that does not happen).
    """
    datagrams: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for record in records:
        if current and size + len(record) > mtu:
            datagrams.append(b"".join(current))
            current, size = [], 0
        current.append(record)
        size += len(record)
    if current:
        datagrams.append(b"".join(current))
    return datagrams


def is_client_hello(datagram: bytes) -> bool:
    """Whether ``datagram`` starts with an epoch-0 handshake record holding a ClientHello.

    Only such a datagram can start a session; anything else from a source
    without one is not worth building a TLS object for.
    """
    return (
        len(datagram) > HEADER_BYTES
        and datagram[0] == HANDSHAKE
        and datagram[1] == DTLS_MAJOR
        and datagram[3:5] == b"\x00\x00"
        and datagram[HEADER_BYTES] == CLIENT_HELLO
    )
