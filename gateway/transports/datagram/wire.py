"""The UDP wire rules the server, ``gateway client`` and ``gateway bench`` share.

Control datagrams start with ``CONTROL_PREFIX``; they are never relayed. See
docs/protocol.md for the exact format. Nothing here imports Twisted.
"""

from __future__ import annotations

from operator import methodcaller

from gateway.dtls.cookies import COOKIE_BYTES

CONTROL_PREFIX = b"\x00GW1"
"""Datagrams starting with these 4 bytes are control datagrams, never messages."""
HELLO = CONTROL_PREFIX + b" hello"
CHALLENGE = CONTROL_PREFIX + b" challenge "
RESPONSE = CONTROL_PREFIX + b" response "
CHALLENGE_SIZE = len(CHALLENGE) + 2 * COOKIE_BYTES
"""47: a datagram shorter than this from an unverified source gets no answer."""
HELLO_SIZE = 64
"""What ``gateway client`` pads its hello to: the challenge's size, with room to spare."""

is_control = methodcaller("startswith", CONTROL_PREFIX)


def hello(size: int = HELLO_SIZE) -> bytes:
    """A hello padded with spaces to ``size`` bytes (never shorter than the bare verb)."""
    return HELLO + b" " * max(0, size - len(HELLO))


def challenge(cookie: bytes) -> bytes:
    """The challenge datagram carrying ``cookie``."""
    return CHALLENGE + cookie.hex().encode("ascii")


def response(cookie_hex: bytes) -> bytes:
    """The response to a challenge whose cookie is ``cookie_hex``."""
    return RESPONSE + cookie_hex


def parse_control(datagram: bytes) -> tuple[bytes, bytes] | None:
    """``(verb, argument)`` of a control datagram, or None for any other datagram.

    The verb follows the prefix and one space; the argument is the next
    space-separated word (empty when there is none); anything after it is padding.
    """
    if not datagram.startswith(CONTROL_PREFIX):
        return None
    verb, _, rest = datagram[len(CONTROL_PREFIX) + 1 :].partition(b" ")
    return verb, rest.partition(b" ")[0]
