"""The small interfaces between the bus and the transports.

The bus reads nothing from a peer that is not declared here.
"""

from __future__ import annotations

from typing import Any, Protocol

from zope.interface import Attribute, Interface

from gateway.core.message import Batch, Origin


class IFramer(Interface):
    """Turns a batch into the wire form of one kind of receiver.

    The bus calls ``frame`` once per batch for all receivers that share the
    framer, so each transport's bytes are made once however many peers get them.
    """

    name: str = Attribute("Short name used in logs and counters, e.g. 'line'.")

    def frame(batch: Batch) -> Any:
        """Return the wire form of ``batch``, or ``None`` when there is nothing to send."""

    def count(wire: Any) -> int:
        """How many messages ``wire`` (made by ``frame``) holds: asked only when it is dropped."""


class Permits(Protocol):
    """What a peer may do (``gateway.auth.roles.Permissions``)."""

    def may_publish(self, channel: str) -> bool: ...

    def may_subscribe(self, pattern: str) -> bool: ...

    def may_receive(self, channel: str) -> bool: ...


class IPeer(Interface):
    """One party attached to the bus, whatever its transport."""

    origin: Origin = Attribute("Who this peer is; stamped on every batch it sends.")
    channel: str = Attribute("The channel this peer sends to and receives from.")
    framer: IFramer = Attribute("How messages are framed for this peer.")
    echo: bool = Attribute("Whether this peer receives its own messages.")
    address: str = Attribute("The remote address, for logs and /peers.")
    subject: str | None = Attribute(
        "Who the peer's TLS client certificate names (its subject), or None."
    )
    pending_bytes: int = Attribute("Bytes waiting for this peer beyond its transport's buffer.")
    dropped_messages: int = Attribute(
        "Messages dropped for this peer so far (slow-consumer policy drop)."
    )

    permissions: Permits | None = Attribute(
        "What the peer may publish, subscribe to and receive; None: anything (an open listener)."
    )

    def deliver(wire: Any) -> None:
        """Send ``wire`` (made by this peer's framer) to the peer, without blocking."""

    def forbidden(action: str, channel: str) -> None:
        """Tell the peer the gateway refused it ``action`` on ``channel``: "publish" (the
        batch was not relayed) or "subscribe" (a subscription ended: no longer allowed)."""

    def close(reason: str) -> None:
        """Disconnect the peer; it detaches from the bus when it is gone."""
