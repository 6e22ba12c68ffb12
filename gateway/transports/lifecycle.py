"""One peer lifecycle for every transport.

A connection is **admitted** (connection caps), gets a **handshake deadline**
when its transport has a handshake, **joins** (peer id, origin, attach to the
bus, the "connected" line, welcome, history), has things **delivered** through
its backlog (slow-consumer policy, counting per message), and goes: closed,
aborted, oversize or idle, each with one reason that is logged and counted,
then **detached**. ``StreamPeer`` is that lifecycle for stream connections
(tcp, tls, ws, wss); transports add only their framing and handshakes.
``ListenerRuntime`` is what all peers of one listener share; UDP peers join
and leave through it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from gateway.auth.roles import Access, Permissions
from gateway.config.listeners import ListenerConfig, StreamListenerConfig
from gateway.config.settings import Limits
from gateway.core.bus import Bus
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind, Origin
from gateway.flow.connection import ConnectionFlow, Governor
from gateway.transports.address import describe
from gateway.transports.sessions import JsonSession, PresenceRelays, Publish

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

    def __post_init__(self) -> None:
        if self.relays is None:  # one per gateway: JSON clients of every listener
            object.__setattr__(self, "relays", PresenceRelays(self.bus))
        if self.access is None:
            object.__setattr__(self, "access", Access({}))


class Closeable(Protocol):
    """An open connection the gateway may have to cut when it stops."""

    def abort(self, reason: str) -> None: ...


class Refusable(Protocol):
    """A peer that may be told of a refusal (see ``ListenerRuntime.forbidden``)."""

    origin: Origin
    framer: IFramer
    refused_at: float  # when it was last told, for the once-a-second limit

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

    def new_origin(self, transport: str, subject: str | None = None) -> Origin:
        """A fresh peer id on this listener (``tls-3``, or ``tls-3:CN`` with a certificate)."""
        peer_id = self.bus.new_peer_id(self.config.name)
        if subject:
            peer_id = f"{peer_id}:{subject}"
        return Origin(peer_id, self.config.name, transport)

    def attach(self, peer: IPeer, verb: str = "connected", extra: str = "") -> int:
        """Put ``peer`` on the bus and log it; returns the peers attached."""
        count = self.bus.attach(peer)
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

    def welcome_text(self, count: int, peer_id: str) -> bytes | None:
        """The listener's ``welcome`` for a peer that just joined, or None without one."""
        config = self.config
        if not isinstance(config, StreamListenerConfig) or not config.welcome:
            return None
        text = config.welcome.format(count=count, peer=peer_id, name=self.context.gateway_name)
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
        batch = Batch(peer.origin, channel, (text.encode("utf-8"),), (Kind.TEXT,))
        peer.deliver(peer.framer.frame(batch))

    def gone(self, peer_id: str, why: str, verb: str = "disconnected") -> None:
        """Log that an attached peer has gone."""
        self.log.info("{peer} {verb} ({reason})", peer=peer_id, verb=verb, reason=why)


class StreamPeer:
    """The lifecycle of one stream connection, mixed into each transport's protocol.

    The transport calls ``_admit`` when the connection is made, ``_join`` once
    its handshake (if any) is done, ``_speak_json`` for a JSON client and
    ``_request`` with what it sends, ``_gone`` (or ``_release``) when the
    connection is lost, and implements ``close`` and ``abort``.
    """

    # Not ``log``: Autobahn's protocols have a ``log`` of their own.
    peer_log = Logger()
    framer: IFramer
    transport: Any
    transport_name = ""
    refused_at = float("-inf")  # when the peer was last told of a refusal (raw peers)

    def _init_peer(self, runtime: ListenerRuntime, transport_name: str) -> None:
        self.runtime = runtime
        self.bus = runtime.bus
        self.transport_name = transport_name
        config = runtime.config
        self.channel = config.channel
        self.echo = config.echo
        self.origin = Origin("", config.name, transport_name)
        self.subject: str | None = None  # the TLS client certificate's subject, if any
        self.flow: ConnectionFlow | None = None
        self._closing = False
        self._close_reason: str | None = None
        self._deadline: IDelayedCall | None = None
        # JSON clients only: their requests and presence (``gateway.transports.sessions``).
        self._session: JsonSession | None = None

    # What the bus reads (IPeer)

    @property
    def address(self) -> str:
        """The remote address (worked out when asked: idle peers stay small)."""
        return describe(self.transport.getPeer()) if self.transport is not None else ""

    @property
    def pending_bytes(self) -> int:
        return self.flow.backlog.pending if self.flow is not None else 0

    @property
    def dropped_messages(self) -> int:
        return self.flow.backlog.dropped_total if self.flow is not None else 0

    # Admit

    def _admit(self, write_through: bool = False, counted: bool = False) -> bool:
        """Count the connection against the caps; False (and aborted) when over one.

        ``counted``: the caps already counted it (a WebSocket that an HTTP
        connection upgraded); the peer takes that count over.
        """
        transport = self.transport
        self.flow = ConnectionFlow(self.runtime.governor, transport, self, write_through)
        remote = transport.getPeer()
        host = getattr(remote, "host", None) or describe(remote)
        if counted:
            self.flow.adopt(host)
        elif not self.flow.admit(host, self.runtime.name):
            self._closing = True
            self._close_reason = CONNECTION_LIMIT
            transport.abortConnection()
            return False
        self.runtime.connections.add(self)
        return True

    # Handshake deadline

    def _arm_deadline(self, seconds: float) -> None:
        """From connect, not an idle timer: a client trickling handshake bytes is cut all the same."""
        self._deadline = self.runtime.clock.callLater(seconds, self._handshake_expired)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _handshake_expired(self) -> None:
        self._deadline = None
        self.bus.metrics.disconnect("handshake_timeout")
        self.abort(f"handshake not finished within {self.runtime.limits.handshake_timeout:g} s")

    # Join

    def _join(self, subject: str | None = None, extra: str = "") -> int:
        """Attach to the bus: id, origin, flow control, the log line, welcome, history."""
        self._disarm_deadline()
        self.subject = subject
        self.origin = self.runtime.new_origin(self.transport_name, subject)
        assert self.flow is not None
        self.flow.start()
        count = self.runtime.attach(self, extra=extra)  # type: ignore[arg-type]
        self._greet(count)
        self.bus.replay_history(self)  # type: ignore[arg-type]
        return count

    def _greet(self, count: int) -> None:
        """The welcome of a peer that just joined: JSON clients' ``welcome`` event, or
        the listener's ``welcome`` text, framed as a message for the peer's transport."""
        if self._session is not None:
            self._session.welcome(count)
            return
        text = self.runtime.welcome_text(count, self.origin.peer_id)
        if text is not None:
            batch = Batch(self.origin, self.channel, (text,), (Kind.TEXT,))
            self.deliver(self.framer.frame(batch))

    # JSON clients

    def _speak_json(self, framer: IFramer) -> None:
        """From now on the client gets JSON events (``framer``) and may send requests."""
        self.framer = framer
        self._session = JsonSession(self, self.bus, self.runtime.context.relays)  # type: ignore[arg-type]

    def _request(self, data: bytes) -> Publish | None:
        """What a JSON client sent: answered here (None), or what to publish."""
        assert self._session is not None
        return self._session.handle(data)

    def _stop_events(self) -> None:
        if self._session is not None:
            self._session.stop()

    # Permissions

    @property
    def permissions(self) -> Permissions | None:
        """The listener's permissions for peers that did not sign in (IPeer)."""
        return self.runtime.permissions

    def forbidden(self, action: str, channel: str) -> None:
        """IPeer: the gateway refused the peer ``action`` on ``channel``."""
        self.runtime.forbidden(self, self._session, action, channel)

    # Deliver

    def deliver(self, wire: Any) -> None:
        # Only attached peers get deliveries, and joining started the flow.
        self.flow.backlog.write(wire)  # type: ignore[union-attr]

    # Go

    def close(self, reason: str) -> None:
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        raise NotImplementedError

    def _leave(self, reason: str) -> None:
        """Stop being a peer now (the connection may linger): the one reason, then detach."""
        self._closing = True
        if self._close_reason is None:
            self._close_reason = reason
        self._stop_events()
        self.bus.detach(self)  # type: ignore[arg-type]

    def _cut_later(self) -> None:
        """Queued output may drain, but a peer that never reads (or never answers a
        close) must not hold the connection open forever."""
        if self._deadline is None and self.transport is not None:
            self._deadline = self.runtime.clock.callLater(
                self.runtime.close_timeout(), self.transport.abortConnection
            )

    def _oversize(self) -> None:
        """Count a message over ``max_message_bytes`` (the transport closes the peer)."""
        self.bus.metrics.drop("oversize")
        self.bus.metrics.disconnect("oversize")

    def slow_consumer(self) -> None:
        """FlowOwner: the peer does not read."""
        self.abort("slow consumer")

    def idle_timeout(self) -> None:
        """FlowOwner: the peer sent nothing for too long."""
        self.abort(f"idle for {self.runtime.limits.idle_timeout:g} s")

    def _gone(self, why: str) -> None:
        """The connection is lost: release everything, log the one reason."""
        self._release()
        if self._close_reason != CONNECTION_LIMIT:
            self._log_gone(why)

    def _release(self) -> None:
        """Give back what the connection held: the bus, its flow control, its place."""
        self._disarm_deadline()
        self._stop_events()
        self.bus.detach(self)  # type: ignore[arg-type]
        if self.flow is not None:
            self.flow.stop()
        self.runtime.connections.discard(self)

    def _log_gone(self, why: str) -> None:
        if self._close_reason is not None:
            why = self._close_reason
        if self.origin.peer_id:
            self.runtime.gone(self.origin.peer_id, why)
        else:
            self._failed_handshake(why)

    def _failed_handshake(self, why: str) -> None:
        """The connection went before it joined."""
        self.bus.metrics.handshake_failed(self.runtime.name)
        self.peer_log.info(
            '{address} failed the handshake on listener "{listener}" ({reason})',
            address=self.address,
            listener=self.runtime.name,
            reason=why,
        )
