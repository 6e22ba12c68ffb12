"""What all peers of one listener share, and what all listeners of one gateway share.

``GatewayContext`` is the gateway's services (bus, flow control, clock, JSON
presence, access and sign-in); ``ListenerRuntime`` is one listener's live side:
its current settings, its open connections, and what its peers are told.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.auth.identities import Authenticator, Identity
from gateway.auth.lockout import Lockout
from gateway.auth.roles import Access
from gateway.config.listeners import ListenerConfig
from gateway.config.settings import Limits
from gateway.core.bus import Bus
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin
from gateway.flow.connection import Governor
from gateway.transports.sessions import JsonSession, PresenceRelays

CONNECTION_LIMIT = "connection limit"
"""The close reason of a connection refused by the caps (never joined, never logged)."""


@dataclass(frozen=True)
class GatewayContext:
    """What every listener of one gateway shares."""

    bus: Bus
    governor: Governor
    clock: IReactorTime
    gateway_name: str
    relays: PresenceRelays = field(default=None)  # type: ignore[assignment]
    access: Access = field(default=None)  # type: ignore[assignment]
    # Who may sign in (listeners with ``auth``); None: no listener signs peers in.
    authenticator: Authenticator = field(default=None)  # type: ignore[assignment]
    lockout: Lockout = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.relays is None:  # one per gateway: JSON clients of every listener
            object.__setattr__(self, "relays", PresenceRelays(self.bus))
        if self.access is None:
            object.__setattr__(self, "access", Access({}))
        if self.lockout is None:
            object.__setattr__(self, "lockout", Lockout(self.clock, 0))


class Closeable(Protocol):
    """An open connection the gateway may have to cut when it stops."""

    def abort(self, reason: str) -> None: ...


class Identified(Protocol):
    """A peer that signed in."""

    @property
    def identity(self) -> Identity | None: ...

    def reauthorize(self, identity: Identity | None) -> None: ...


class Refusable(Protocol):
    """A peer that may be told of a refusal (see ``ListenerRuntime.forbidden``)."""

    origin: Origin
    framer: IFramer
    refused_at: float  # when it was last told, for the once-a-second limit
    quiet: bool  # True: its stream is binary, and the gateway writes no text of its own into it

    def deliver(self, wire: Any) -> None: ...


class ListenerRuntime:
    """The live side of one listener: its current settings, the gateway's shared
    services, and its open connections.

    A config reload replaces ``config`` and ``limits`` (``reconfigure``); peers
    read them from here, so new connections see the new values.
    """

    log = Logger()

    def __init__(self, config: ListenerConfig, limits: Limits, context: GatewayContext) -> None:
        self.config = config
        self.limits = limits
        self.context = context
        self.bus = context.bus
        self.governor = context.governor
        self.clock = context.clock
        # Open connections, attached or handshaking or closing; a drain waits for them.
        self.connections: set[Closeable] = set()
        # Set while the gateway drains: how long closed peers may take then.
        self.draining: float | None = None
        # The peers that signed in (a reload re-checks who they are).
        self.identified: set[Identified] = set()
        # What peers that did not sign in may do; None: anything (an open listener).
        self.permissions = context.access.anonymous(config.anonymous_role)

    @property
    def name(self) -> str:
        return self.config.name

    def reconfigure(self, config: ListenerConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self.permissions = self.context.access.anonymous(config.anonymous_role)

    def abort_all(self, reason: str) -> None:
        """Cut every connection still open (the end of a drain)."""
        for connection in list(self.connections):
            connection.abort(reason)

    def close_timeout(self) -> float:
        """How long a closed peer may take to drain its queued output (and, over TLS,
        to answer close_notify) before it is cut."""
        return self.draining if self.draining is not None else self.limits.handshake_timeout

    def new_origin(
        self, transport: str, subject: str | None = None, user: str | None = None
    ) -> Origin:
        """A fresh peer id on this listener (``tls-3``, or ``tls-3:CN`` with a certificate),
        and the user it signed in as, if any."""
        peer_id = self.bus.new_peer_id(self.config.name)
        if subject:
            peer_id = f"{peer_id}:{subject}"
        return Origin(peer_id, self.config.name, transport, user)

    def reauthorize(self) -> None:
        """A reload: every signed-in peer gets its current roles, or goes when revoked."""
        authenticator = self.context.authenticator
        for peer in list(self.identified):
            identity = peer.identity
            if identity is not None:
                peer.reauthorize(authenticator.still_valid(identity))

    def signed_in(self, host: str | None, method: str, result: str) -> None:
        """Count a sign-in's outcome; a failure also counts against the peer's ``host``."""
        self.bus.metrics.auth(self.config.name, method, result)
        if result == "ok":
            return
        if host and self.context.lockout.failed(host):
            self.context.governor.warnings.emit(
                "auth_lockout",
                "{host} failed to sign in over {limit} times in a minute: refused for 60 s",
                host=host,
                limit=self.limits.max_auth_failures,
            )

    def attach(self, peer: IPeer, verb: str = "connected", extra: str = "") -> int:
        """Put ``peer`` on the bus and log it; returns the peers attached."""
        count = self.bus.attach(peer, later=True)  # the caller then greets it
        self.log.info(
            '{peer} {verb} from {address} (listener "{listener}", {count} peers{extra})',
            peer=peer.origin.peer_id,
            verb=verb,
            address=peer.address,
            listener=self.config.name,
            count=count,
            extra=extra,
        )
        return count

    def welcome_text(self, count: int, origin: Origin) -> bytes | None:
        """The listener's ``welcome`` for a peer that just joined, or None without one."""
        welcome: str = getattr(self.config, "welcome", "")  # stream and dtls listeners
        if not welcome:
            return None
        text = welcome.format(
            count=count,
            peer=origin.peer_id,
            name=self.context.gateway_name,
            user=origin.user or "",
        )
        return text.encode("utf-8")

    def forbidden(
        self, peer: Refusable, session: JsonSession | None, action: str, channel: str
    ) -> None:
        """Tell ``peer`` (of this listener) it was refused ``action`` on ``channel``: a
        JSON client (``session``) by an event, anyone else by a message of text, at most
        once a second."""
        if session is not None:
            session.forbidden(action, channel)
            return
        now = self.clock.seconds()
        if now - peer.refused_at < 1.0:
            return
        peer.refused_at = now
        if action == "publish":
            text = f"gateway: not allowed to publish to {channel}"
        else:
            text = f"gateway: no longer allowed to read {channel}"
        tell(peer, text.encode("utf-8"), channel)

    def gone(self, peer_id: str, why: str, verb: str = "disconnected") -> None:
        """Log that an attached peer has gone."""
        self.log.info("{peer} {verb} ({reason})", peer=peer_id, verb=verb, reason=why)


def tell(peer: Refusable, text: bytes, channel: str) -> None:
    """Send ``peer`` one text message from the gateway itself, framed for its transport
    (nothing to a ``quiet`` peer, whose stream is binary)."""
    if peer.quiet:
        return
    peer.deliver(peer.framer.frame(Batch(peer.origin, channel, (text,), (Kind.TEXT,))))
