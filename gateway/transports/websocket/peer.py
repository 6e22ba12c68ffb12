"""WebSocket peers (the ``ws`` listener; ``wss`` is the same site behind TLS).

Each WebSocket message is one bus message, text or binary as its opcode says.
Clients that negotiate the ``gateway.v1.json`` subprotocol get JSON envelopes
that name each sender, plus welcome and join/leave events.

Fan-out never goes through Autobahn's per-message send path: a framer builds
the (unmasked, uncompressed) frames of a batch once, and every receiver gets
those same bytes in one write. On a plain ``ws`` connection that write goes
straight to the socket while Twisted holds nothing for it (``WriteThrough``,
as for plain TCP peers); Autobahn's own writes (the handshake's response,
pings, pongs, close frames) announce themselves first (``sendData``), so
nothing overtakes them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.auth.identities import Identity
from gateway.config.listeners import WsListenerConfig
from gateway.core.channels import is_name
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Kind
from gateway.transports.lifecycle import StreamPeer
from gateway.transports.runtime import ListenerRuntime
from gateway.transports.signin import NOBODY, header_identity
from gateway.transports.websocket.envelope import (
    JSON_FRAMER,
    JSON_SUBPROTOCOL,
)
from gateway.transports.websocket.frames import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    RAW_FRAMER,
)
from gateway.transports.websocket.origins import OriginPolicy
from gateway.transports.websocket.timers import ClockTimer

CLOSE_AUTH = 4001
"""The close code of a WebSocket that did not sign in (failed, timed out, revoked)."""
MAX_HELD = 1000
"""At most this many messages may arrive while a sign-in is checked (reading is paused)."""
_TEXT_ONLY = (Kind.TEXT,)
_BINARY_ONLY = (Kind.BINARY,)


@implementer(IPeer)
class WebSocketPeer(StreamPeer, WebSocketServerProtocol):  # type: ignore[misc]
    """One WebSocket client: relays its messages and receives the channel's."""

    framer: IFramer = RAW_FRAMER
    _held: list[tuple[bytes, bool]] | None = None  # while signing in: messages received

    def __init__(self, factory: WebSocketPeerFactory) -> None:
        super().__init__()
        self.factory = factory
        self._init_peer(factory.runtime, factory.runtime.config.type)
        self._json = False

    # Connection lifecycle

    def connectionMade(self) -> None:
        super().connectionMade()
        # The gateway's own site counted the HTTP connection against the caps;
        # the WebSocket takes that over. Mounted elsewhere, it counts itself.
        self._admit(write_through=_plain_socket(self.transport), counted=self.factory.counted)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self._release()

    def dropConnection(self, abort: bool = False) -> None:
        """Autobahn ends the connection: leave the bus now, whatever the client does.

        A gentle drop (``abort=False``) waits for the client to close its side;
        over TLS that wait has no end of its own, so it gets a deadline.
        """
        self._stop_events()
        self.bus.detach(self)
        if not abort:
            self._cut_later()
        super().dropConnection(abort)

    def dataReceived(self, data: bytes) -> None:
        if self.flow is not None:
            self.flow.received(0)  # any traffic, pongs included, keeps the peer from idling out
        super().dataReceived(data)

    def onConnect(  # type: ignore[override]  # Autobahn takes a Deferred too (txaio.as_future)
        self, request: ConnectionRequest
    ) -> str | Deferred[str | None] | None:
        origin = request.origin  # "" when the client sent none
        if not self.factory.origins.allows(origin, request.headers.get("host")):
            self.peer_log.info(
                "{address} refused: origin {origin} not allowed "
                '(listener "{listener}", host {host})',
                address=self.address,
                origin=origin,
                listener=self.runtime.name,
                host=request.headers.get("host"),
            )
            self.bus.metrics.disconnect("origin_refused")
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        header = request.headers.get("authorization")
        if header and self.runtime.config.auth:
            # Signed in by the upgrade request (non-browser clients); a bad one gets 401.
            authenticator = self.runtime.context.authenticator
            checked = header_identity(header, self.runtime.config.auth, authenticator)
            return checked.addCallback(lambda identity: self._accept(request, identity))
        return self._accept(request, None)

    def _accept(self, request: ConnectionRequest, identity: Identity | None) -> str | None:
        if identity is not None:
            if identity is NOBODY:
                self.runtime.signed_in(self._host(), "header", "failed")
                self.bus.metrics.disconnect("auth_failed")
                raise ConnectionDeny(401, "authentication failed")
            self.runtime.signed_in(self._host(), identity.method, "ok")
            self._become(identity)
        self._start_channel(request.path)
        if JSON_SUBPROTOCOL in request.protocols:
            self._since = self._start_since(request.params)
            self._json = True
            self._speak_json(JSON_FRAMER)
            return JSON_SUBPROTOCOL
        return None

    def _start_channel(self, path: str) -> None:
        """``/ws/room.42`` starts the client on ``room.42`` instead of the listener's channel."""
        base = self.factory.path
        if base is None or path == base:
            return
        name = unquote(path[len(base) + 1 :]) if path.startswith(base + "/") else ""
        if not is_name(name):
            self.bus.metrics.disconnect("bad_channel")
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "not a channel name")
        permissions = self.permissions
        if permissions is not None and not permissions.may_subscribe(name):
            self.bus.metrics.deny("subscribe")
            self.bus.metrics.disconnect("forbidden")
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "not allowed to subscribe to it")
        self.channel = name

    def _start_since(self, params: dict[str, list[str]]) -> tuple[int, str] | None:
        """``?since=17&epoch=E``: a JSON client resumes its starting channel after offset 17
        of epoch E (``gateway.core.history``); raw clients' queries are ignored."""
        if "since" not in params and "epoch" not in params:
            return None
        offset, epoch = params.get("since", [""])[0], params.get("epoch", [])
        if not (offset.isascii() and offset.isdigit() and len(offset) <= 20 and epoch):
            self.bus.metrics.disconnect("bad_request")
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "since needs an offset and an epoch")
        return int(offset), epoch[0]

    def onOpen(self) -> None:
        transport: Any = self.transport
        # The HTTP channel that read the upgrade request is still the
        # transport's producer; the slow-consumer signal must come to us.
        transport.unregisterProducer()
        self._join(extra=", json" if self._json else "")

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self._stop_events()
        self.bus.detach(self)
        if not self.origin.peer_id:
            return  # never opened; Autobahn logged why
        if self.failedByMe and self._close_reason is None:
            self._count_failure(self.localCloseCode)
        self._log_gone(self._why(was_clean, code, reason))

    def _why(self, clean: bool, code: int | None, reason: str | None) -> str:
        if self.failedByMe:
            text = (self.localCloseReason or b"").decode("utf-8", "replace")
            return f"closed with code {self.localCloseCode}: {text}"
        if clean:
            return f"closed by the peer, code {code}" + (f": {reason}" if reason else "")
        return f"connection lost: {reason}"

    def _count_failure(self, code: int | None) -> None:
        if code == CLOSE_MESSAGE_TOO_BIG:
            self._oversize()
        elif code == CLOSE_INVALID_PAYLOAD:
            self.bus.metrics.drop("invalid_utf8")
            self.bus.metrics.disconnect("invalid_utf8")
        else:
            self.bus.metrics.disconnect("protocol_error")

    # Inbound

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        if self._closing:
            return
        if self._signin is not None:
            self._hold(payload, is_binary)
            return
        if self.flow is not None:
            self.flow.received(1)
        kinds: tuple[Kind, ...] = _BINARY_ONLY if is_binary else _TEXT_ONLY
        channel = self.channel
        if self._json and not is_binary:
            request = self._request(payload)
            if request is None:
                return  # answered
            channel, payload, kind = request
            kinds = _BINARY_ONLY if kind is Kind.BINARY else _TEXT_ONLY
        self.bus.publish(self, Batch(self.origin, channel, (payload,), kinds))

    # Signing in

    def _hold(self, payload: bytes, is_binary: bool) -> None:
        """Until signed in: the first message is the sign-in (text only); later ones wait."""
        held = self._held
        if held is None:
            held = self._held = []
            held.append((payload, is_binary))
            self._sign_in(payload, ordinary=is_binary)
        elif len(held) <= MAX_HELD:
            held.append((payload, is_binary))  # reading is paused: only what was in flight
        else:
            self.close("too many messages before signing in", CLOSE_POLICY_VIOLATION)

    def _resume_input(self, first_is_ordinary: bool) -> None:
        held = self._held or []
        self._held = None
        for payload, is_binary in held[0 if first_is_ordinary else 1 :]:
            self.onMessage(payload, is_binary)

    def _close_unauthenticated(self, reason: str) -> None:
        self.close(reason, CLOSE_AUTH)

    # Outbound (IPeer)

    def deliver(self, wire: bytes) -> None:
        # Frames written while the connection is closing would break the
        # closing handshake, and must never raise into the sender.
        if self.state != self.STATE_OPEN:
            return
        # Past the transport's own 64 KiB, what may wait is bounded by the backlog.
        self.flow.backlog.write(wire)  # type: ignore[union-attr]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's every write (handshake response, pings, pongs, close frames): the
        backlog hears of it first, so what it writes straight to the socket never
        overtakes these bytes, or lands inside them. ``sync`` and ``chopsize`` writes
        happen later, from Autobahn's queue: after one, nothing is written through."""
        flow = self.flow
        if flow is not None:
            flow.backlog.hold(len(data), lasting=sync or bool(chopsize))
        super().sendData(data, sync, chopsize)

    def close(self, reason: str, code: int = CLOSE_GOING_AWAY) -> None:
        """Start the closing handshake with ``code`` and ``reason`` (1001 by default)."""
        if self._closing:
            return
        self._leave(reason)
        state = getattr(self, "state", self.STATE_CLOSED)
        if state == self.STATE_OPEN:
            # How long the client may take to answer (and read what is queued):
            # the same deadline as a closing line peer's, the drain's while draining.
            self.closeHandshakeTimeout = self.runtime.close_timeout()
            self.sendCloseFrame(code=code, reasonUtf8=_close_reason(reason), isReply=False)
        elif state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def abort(self, reason: str) -> None:
        """Drop the connection now, discarding anything not yet sent."""
        self._leave(reason)
        if getattr(self, "state", self.STATE_CLOSED) != self.STATE_CLOSED:
            self.dropConnection(abort=True)
        else:
            transport: Any = self.transport
            transport.abortConnection()

    def slow_consumer(self) -> None:
        """FlowOwner: the peer does not read: close 1008, then drop."""
        self._close_reason = None
        self._leave("slow consumer")
        self.sendCloseFrame(code=CLOSE_POLICY_VIOLATION, reasonUtf8=b"slow consumer", isReply=False)
        self.dropConnection(abort=True)


def _plain_socket(transport: object) -> bool:
    """Whether ``transport`` is a TCP (or unix) socket with nothing between it and the
    peer: no TLS and no wrapping protocol, so its bytes may be written to the socket."""
    return isinstance(transport, Connection) and not ISSLTransport.providedBy(transport)


def _close_reason(reason: str) -> bytes:
    """``reason`` as UTF-8 cut to the 123 bytes a close frame has room for."""
    return reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")


class WebSocketPeerFactory(WebSocketServerFactory):
    """Autobahn's factory for one listener, with the gateway's safe settings."""

    def __init__(
        self, runtime: ListenerRuntime, counted: bool = False, path: str | None = None
    ) -> None:
        super().__init__(server=None, reactor=runtime.clock)  # type: ignore[no-untyped-call]
        self.runtime = runtime
        # Whether the HTTP connections that upgrade were already counted against the caps.
        self.counted = counted
        # Where the endpoint is mounted, when ``<path>/<channel>`` may name the starting channel.
        self.path = path
        # Autobahn's only seam for a clock other than txaio's global reactor.
        self._batched_timer = ClockTimer(runtime.clock)
        self.configure()

    def configure(self) -> None:
        """Apply the listener's settings (again, on a config reload) for new connections."""
        config = self.runtime.config
        assert isinstance(config, WsListenerConfig)
        limits = self.runtime.limits
        self.origins = OriginPolicy(config.allowed_origins)
        ping = config.ping_interval
        self.setProtocolOptions(  # type: ignore[no-untyped-call]
            webStatus=False,
            utf8validateIncoming=True,
            maxFramePayloadSize=limits.max_message_bytes,
            maxMessagePayloadSize=limits.max_message_bytes,
            failByDrop=False,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=limits.handshake_timeout,
            autoPingInterval=ping,
            autoPingTimeout=ping,
            # No extensions: permessage-deflate would make frames differ per receiver.
            perMessageCompressionAccept=lambda offers: None,
            # Origins are checked in onConnect, where a refusal is a 403.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )

    def buildProtocol(self, addr: object) -> WebSocketPeer:
        return WebSocketPeer(self)
