"""WebSocket peers (the ``ws`` listener; ``wss`` is the same site behind TLS).

One port serves the browser client page at ``/`` and the WebSocket at ``/ws``.
Each WebSocket message is one bus message, text or binary as its opcode says.
Clients that negotiate the ``gateway.v1.json`` subprotocol get JSON envelopes
that name each sender, plus welcome and join/leave events.

Fan-out never goes through Autobahn's per-message send path: a framer builds
the (unmasked, uncompressed) frames of a batch once, and every receiver gets
those same bytes in one ``transport.write``.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from gateway.address import describe
from gateway.bus import Bus, RemotePeer
from gateway.config import Limits, StreamListenerConfig
from gateway.flow import Backlog, FlowContext, StreamFlow
from gateway.interfaces import IFramer, IPeer
from gateway.message import Batch, Kind, Origin

JSON_SUBPROTOCOL = "gateway.v1.json"
"""The subprotocol of clients that want JSON envelopes and presence events."""

WEBSOCKET_PATH = "/ws"
MAX_WELCOME_PEERS = 1000
"""At most this many entries in the ``peers`` list of a JSON welcome."""

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
_TEXT_ONLY = (Kind.TEXT,)
_BINARY_ONLY = (Kind.BINARY,)
_json_string = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


# Framing


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


@implementer(IFramer)
class RawFramer:
    """Each payload as one frame, text or binary by its kind; a batch in one bytes object."""

    name = "websocket"

    def frame(self, batch: Batch) -> bytes:
        payloads = batch.payloads
        kinds = batch.kinds
        if kinds is None and batch.lines is not None and batch.lines.isascii():
            kinds = _TEXT_ONLY * len(payloads)
        if len(payloads) == 1:
            payload = payloads[0]
            kind = kinds[0] if kinds is not None else Kind.of(payload)
            return frame_header(len(payload), _OPCODES[kind]) + payload
        parts: list[bytes] = []
        messages = batch.messages() if kinds is None else zip(payloads, kinds, strict=True)
        for payload, kind in messages:
            parts.append(frame_header(len(payload), _OPCODES[kind]))
            parts.append(payload)
        return b"".join(parts)


@implementer(IFramer)
class JsonFramer:
    """Each payload as a JSON envelope in one text frame; a batch in one bytes object."""

    name = "websocket-json"

    def frame(self, batch: Batch) -> bytes:
        origin = batch.origin
        head = (
            '{"type":"message","from":'
            + _json_string(origin.peer_id)
            + ',"transport":'
            + _json_string(origin.transport)
            + ',"listener":'
            + _json_string(origin.listener)
            + ',"channel":'
            + _json_string(batch.channel)
        )
        if batch.history:
            head += ',"history":true'
        parts: list[bytes] = []
        kinds = batch.kinds if batch.kinds is not None else (None,) * len(batch.payloads)
        for payload, kind in zip(batch.payloads, kinds, strict=True):
            envelope = (head + _payload_field(payload, kind) + "}").encode("utf-8")
            parts.append(frame_header(len(envelope), OPCODE_TEXT))
            parts.append(envelope)
        return b"".join(parts)


def _payload_field(payload: bytes, kind: Kind | None) -> str:
    if kind is not Kind.BINARY:
        try:
            return ',"text":' + _json_string(payload.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return ',"base64":"' + base64.b64encode(payload).decode("ascii") + '"'


RAW_FRAMER = RawFramer()
JSON_FRAMER = JsonFramer()


def json_event(event: dict[str, Any]) -> bytes:
    """A JSON event (welcome, join, leave) as one text frame."""
    return frame_message(_json_string(event).encode("utf-8"), OPCODE_TEXT)


def parse_envelope(data: bytes) -> tuple[bytes, Kind] | None:
    """The payload of a ``{"type":"message",...}`` text frame, or None if it is not one."""
    if data.lstrip(b" \t\r\n")[:1] != b"{":
        return None
    try:
        envelope = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(envelope, dict) or envelope.get("type") != "message":
        return None
    text = envelope.get("text")
    if isinstance(text, str):
        try:
            return text.encode("utf-8"), Kind.TEXT
        except UnicodeEncodeError:  # a lone surrogate written as \\udXXX
            return None
    encoded = envelope.get("base64")
    if isinstance(encoded, str):
        try:
            return base64.b64decode(encoded, validate=True), Kind.BINARY
        except (binascii.Error, ValueError):
            return None
    return None


# Origins


def _origin_parts(origin: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(parts.scheme)
    return parts.scheme, parts.hostname, port


class OriginPolicy:
    """Which browser pages may open a WebSocket (checked against the ``Origin`` header).

    ``allowed`` is ``None`` for same-origin only (the Origin's host and port
    equal the ``Host`` header's, a missing port meaning the default of the
    Origin's scheme), ``("*",)`` for any page, or a list of
    ``scheme://host[:port]`` origins. Requests without an Origin header come
    from non-browser clients and are always allowed.
    """

    def __init__(self, allowed: tuple[str, ...] | None) -> None:
        self.any = allowed is not None and "*" in allowed
        self.same_origin = allowed is None
        self.listed = {
            parts
            for parts in (_origin_parts(origin) for origin in allowed or ())
            if parts is not None
        }

    def allows(self, origin: str | None, host: str | None) -> bool:
        """Whether a handshake with these ``Origin`` and ``Host`` headers may proceed."""
        if not origin or self.any:
            return True
        parts = _origin_parts(origin)
        if parts is None:  # "null" (sandboxed pages, file://) or garbage
            return False
        if not self.same_origin:
            return parts in self.listed
        if not host:
            return False
        try:
            target = urlsplit("//" + host.strip().lower())
            host_port = target.port
        except ValueError:
            return False
        scheme, origin_host, origin_port = parts
        if host_port is None:
            host_port = _DEFAULT_PORTS.get(scheme)
        return origin_host == target.hostname and origin_port == host_port


# Presence


class _PresenceRelay:
    """Tells the JSON clients of one listener who joins and leaves their channel.

    One bus watcher per listener: each event is framed once and written to
    every JSON client, like a batch.
    """

    log = Logger()

    def __init__(self, bus: Bus, channel: str) -> None:
        self.bus = bus
        self.channel = channel
        self.clients: dict[WebSocketPeer, None] = {}

    def add(self, client: WebSocketPeer) -> None:
        if not self.clients:
            self.bus.watch_presence(self.channel, self.announce)
        self.clients[client] = None

    def discard(self, client: WebSocketPeer) -> None:
        if client in self.clients:
            del self.clients[client]
            if not self.clients:
                self.bus.unwatch_presence(self.channel, self.announce)

    def announce(self, event: str, peer: IPeer | RemotePeer, count: int) -> None:
        wire = json_event(
            {
                "type": event,
                "peer": peer.origin.peer_id,
                "transport": peer.origin.transport,
                "count": count,
            }
        )
        for client in tuple(self.clients):
            if client is peer:
                continue
            try:
                client.deliver(wire)
            except Exception:
                self.log.failure("presence event to {peer} failed", peer=client.origin.peer_id)
                client.close("delivery failed")


# Autobahn's timers


class _Cancellable:
    __slots__ = ("call",)

    def __init__(self, call: IDelayedCall) -> None:
        self.call = call

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


class _ClockTimer:
    """Autobahn's timer interface (txaio ``IBatchedTimer``) on the injected clock.

    Autobahn otherwise schedules its handshake, close and ping timers on
    txaio's global reactor, in whole-second buckets.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def call_later(
        self, delay: float, func: Callable[..., object], *args: object, **kwargs: object
    ) -> _Cancellable:
        return _Cancellable(self.clock.callLater(delay, func, *args, **kwargs))


# The peer


class _Closeable(Protocol):
    def abort(self, reason: str) -> None: ...


@implementer(IPeer)
class WebSocketPeer(WebSocketServerProtocol):
    """One WebSocket client: relays its messages and receives the channel's."""

    logger = Logger()

    def __init__(self, factory: WebSocketPeerFactory) -> None:
        super().__init__()
        self.factory = factory
        self.bus = factory.bus
        self.listener = factory.listener
        self.channel = factory.listener.channel
        self.echo = factory.listener.echo
        self.origin = Origin("", factory.listener.name, factory.listener.type)
        self.framer: IFramer = RAW_FRAMER
        self.address = ""
        self._json = False
        self._closing = False
        self._close_reason: str | None = None
        self.flow: StreamFlow | None = None
        self.backlog: Backlog | None = None
        self._cut: IDelayedCall | None = None

    # Connection lifecycle

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        remote = transport.getPeer()
        self.address = describe(remote)
        self.flow = StreamFlow(self.factory.flow, transport, self)
        # The HTTP channel counted this connection against the caps; it is ours now.
        self.flow.adopt(getattr(remote, "host", self.address))
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._cut is not None and self._cut.active():
            self._cut.cancel()
        super().connectionLost(reason)
        if self.flow is not None:
            self.flow.stop()
        self.factory.connections.discard(self)

    def dropConnection(self, abort: bool = False) -> None:
        """Autobahn ends the connection: leave the bus now, whatever the client does.

        A gentle drop (``abort=False``) waits for the client to close its side;
        over TLS that wait has no end of its own, so it gets a deadline.
        """
        self.factory.presence.discard(self)
        self.bus.detach(self)
        if not abort and self._cut is None:
            transport: Any = self.transport
            if transport is not None:
                self._cut = self.factory.clock.callLater(
                    self.factory.limits.handshake_timeout, transport.abortConnection
                )
        super().dropConnection(abort)

    def dataReceived(self, data: bytes) -> None:
        if self.flow is not None:
            self.flow.received(0)  # any traffic, pongs included, keeps the peer from idling out
        super().dataReceived(data)

    def onConnect(self, request: ConnectionRequest) -> str | None:
        origin = request.origin  # "" when the client sent none
        if not self.factory.origins.allows(origin, request.headers.get("host")):
            self.logger.info(
                "{address} refused: origin {origin} not allowed "
                '(listener "{listener}", host {host})',
                address=self.address,
                origin=origin,
                listener=self.listener.name,
                host=request.headers.get("host"),
            )
            self.bus.metrics.disconnect("origin_refused")
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        if JSON_SUBPROTOCOL in request.protocols:
            self._json = True
            self.framer = JSON_FRAMER
            return JSON_SUBPROTOCOL
        return None

    def onOpen(self) -> None:
        transport: Any = self.transport
        # The HTTP channel that read the upgrade request is still the
        # transport's producer; the slow-consumer signal must come to us.
        transport.unregisterProducer()
        assert self.flow is not None
        self.flow.start()
        self.backlog = self.flow.backlog
        listener = self.listener
        self.origin = Origin(self.bus.new_peer_id(listener.name), listener.name, listener.type)
        count = self.bus.attach(self)
        self.logger.info(
            '{peer} connected from {address} (listener "{listener}", {count} peers{json})',
            peer=self.origin.peer_id,
            address=self.address,
            listener=listener.name,
            count=count,
            json=", json" if self._json else "",
        )
        if self._json:
            self.deliver(self._welcome_event(count))
            self.factory.presence.add(self)
        elif listener.welcome:
            text = listener.welcome.format(
                count=count, peer=self.origin.peer_id, name=self.factory.gateway_name
            )
            self.deliver(frame_message(text.encode("utf-8"), OPCODE_TEXT))
        self.bus.replay_history(self)

    def _welcome_event(self, count: int) -> bytes:
        peers = self.bus.peers(self.channel)
        return json_event(
            {
                "type": "welcome",
                "peer": self.origin.peer_id,
                "count": count,
                "channel": self.channel,
                "peers": [
                    {"peer": peer.origin.peer_id, "transport": peer.origin.transport}
                    for peer in peers[:MAX_WELCOME_PEERS]
                ],
                "channel_count": len(peers),
            }
        )

    def onClose(self, was_clean: bool, code: int | None, reason: str | None) -> None:
        self.factory.presence.discard(self)
        self.bus.detach(self)
        if not self.origin.peer_id:
            return  # never opened; Autobahn logged why
        if self.failedByMe and self._close_reason is None:
            self._count_failure(self.localCloseCode)
        self.logger.info(
            "{peer} disconnected ({reason})",
            peer=self.origin.peer_id,
            reason=self._why(was_clean, code, reason),
        )

    def _why(self, clean: bool, code: int | None, reason: str | None) -> str:
        if self._close_reason is not None:
            return self._close_reason
        if self.failedByMe:
            text = (self.localCloseReason or b"").decode("utf-8", "replace")
            return f"closed with code {self.localCloseCode}: {text}"
        if clean:
            return f"closed by the peer, code {code}" + (f": {reason}" if reason else "")
        return f"connection lost: {reason}"

    def _count_failure(self, code: int | None) -> None:
        if code == CLOSE_MESSAGE_TOO_BIG:
            self.bus.metrics.drop("oversize")
            self.bus.metrics.disconnect("oversize")
        elif code == CLOSE_INVALID_PAYLOAD:
            self.bus.metrics.drop("invalid_utf8")
            self.bus.metrics.disconnect("invalid_utf8")
        else:
            self.bus.metrics.disconnect("protocol_error")

    # Inbound

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        if self._closing:
            return
        if self.flow is not None:
            self.flow.received(1)
        kinds: tuple[Kind, ...] = _BINARY_ONLY if is_binary else _TEXT_ONLY
        if self._json and not is_binary:
            envelope = parse_envelope(payload)
            if envelope is not None:
                payload, kind = envelope
                kinds = _BINARY_ONLY if kind is Kind.BINARY else _TEXT_ONLY
        self.bus.publish(self, Batch(self.origin, self.channel, (payload,), kinds))

    # Outbound (IPeer)

    def deliver(self, wire: bytes) -> None:
        # Frames written while the connection is closing would break the
        # closing handshake, and must never raise into the sender.
        if self.state != self.STATE_OPEN:
            return
        # Past the transport's own 64 KiB, what may wait is bounded by the backlog.
        self.backlog.write(wire)  # type: ignore[union-attr]

    def close(self, reason: str, code: int = CLOSE_GOING_AWAY) -> None:
        """Start the closing handshake with ``code`` and ``reason`` (1001 by default)."""
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason
        self.factory.presence.discard(self)
        self.bus.detach(self)
        state = getattr(self, "state", self.STATE_CLOSED)
        if state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=_close_reason(reason), isReply=False)
        elif state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def abort(self, reason: str) -> None:
        """Drop the connection now, discarding anything not yet sent."""
        self._closing = True
        if self._close_reason is None:
            self._close_reason = reason
        self.factory.presence.discard(self)
        self.bus.detach(self)
        if getattr(self, "state", self.STATE_CLOSED) != self.STATE_CLOSED:
            self.dropConnection(abort=True)
        else:
            transport: Any = self.transport
            transport.abortConnection()

    def slow_consumer(self) -> None:
        """FlowOwner: the peer does not read: close 1008, then drop."""
        self._closing = True
        self._close_reason = "slow consumer"
        self.factory.presence.discard(self)
        self.bus.detach(self)
        self.sendCloseFrame(code=CLOSE_POLICY_VIOLATION, reasonUtf8=b"slow consumer", isReply=False)
        self.dropConnection(abort=True)

    def idle_timeout(self) -> None:
        """FlowOwner: the peer sent nothing (not even a pong) for too long."""
        self.abort(f"idle for {self.factory.limits.idle_timeout:g} s")


def _close_reason(reason: str) -> bytes:
    """``reason`` as UTF-8 cut to the 123 bytes a close frame has room for."""
    return reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")


class WebSocketPeerFactory(WebSocketServerFactory):
    """Autobahn's factory for one listener, with the gateway's safe settings."""

    def __init__(
        self,
        bus: Bus,
        listener: StreamListenerConfig,
        limits: Limits,
        gateway_name: str,
        clock: IReactorTime,
        connections: set[_Closeable],
        flow: FlowContext,
    ) -> None:
        super().__init__(server=None, reactor=clock)  # type: ignore[no-untyped-call]
        self.flow = flow
        self.bus = bus
        self.gateway_name = gateway_name
        self.clock = clock
        self.connections = connections
        self.presence = _PresenceRelay(bus, listener.channel)
        # Autobahn's only seam for a clock other than txaio's global reactor.
        self._batched_timer = _ClockTimer(clock)
        self.configure(listener, limits)

    def configure(self, listener: StreamListenerConfig, limits: Limits) -> None:
        """Apply the listener's settings (again, on a config reload) for new connections."""
        self.listener = listener
        self.limits = limits
        self.origins = OriginPolicy(listener.allowed_origins)
        ping = listener.ping_interval
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


# HTTP


class HandshakeDeadlineChannel(HTTPChannel):
    """An HTTP connection that must send a complete request in time.

    The deadline runs from connect (and again after each response) until a
    whole request has arrived; a WebSocket upgrade is handled at once, and from
    then on Autobahn's own timeouts apply. Slow or silent clients are dropped.
    """

    logger = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        connections: set[_Closeable],
        flow: FlowContext,
        listener: str,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.clock = clock
        self.deadline_seconds = timeout
        self.connections = connections
        self.flow = flow
        self.listener = listener
        self._deadline: IDelayedCall | None = None
        self._admitted: str | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        remote = transport.getPeer()
        host = getattr(remote, "host", describe(remote))
        if not self.flow.gate.admit(host, self.listener):
            transport.abortConnection()
            return
        self._admitted = host
        super().connectionMade()  # type: ignore[no-untyped-call]
        if ITCPTransport.providedBy(transport):
            transport.setTcpKeepAlive(True)
        self.connections.add(self)
        self._arm()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()  # type: ignore[no-untyped-call]
        if self.transport is None:
            # A WebSocket took the connection over; it tracks (and releases) it now.
            self.connections.discard(self)
            self._admitted = None

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if self.transport is not None:
            self._arm()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._disarm()
        self.connections.discard(self)
        if self._admitted is not None:
            self.flow.gate.release(self._admitted)
            self._admitted = None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def abort(self, reason: str) -> None:
        """Drop the connection now (the gateway is stopping)."""
        self._disarm()
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.clock.callLater(self.deadline_seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        if transport is None:
            return
        self.logger.info(
            "{address} sent no complete request within {timeout:g} s; dropping",
            address=describe(transport.getPeer()),
            timeout=self.deadline_seconds,
        )
        transport.abortConnection()


class _Root(Resource):
    """The page's files and the WebSocket; anything else is a plain 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class StaticFile(Resource):
    """One file of the client page, loaded once."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.body = body
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'self'; style-src 'self'; "
            b"connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; "
            b"form-action 'none'; frame-ancestors 'none'",
        )
        return self.body


STATIC_FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"style.css": ("style.css", b"text/css; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


class WebSocketSite(Site):
    """The site of one ``ws``/``wss`` listener: the page at ``/``, the WebSocket at ``/ws``.

    ``connections`` holds every open connection (HTTP or WebSocket); each has
    ``abort(reason)``, for the gateway to drop stragglers when it stops.
    """

    noisy = False
    logger = Logger()

    def __init__(
        self,
        root: Resource,
        clock: IReactorTime,
        handshake_timeout: float,
        connections: set[_Closeable],
        flow: FlowContext,
        listener: str,
    ) -> None:
        super().__init__(root, reactor=clock)  # type: ignore[no-untyped-call]
        self.flow = flow
        self.listener = listener
        self.peer_factory: WebSocketPeerFactory | None = None
        # The channels' own deadline replaces Twisted's idle timeout.
        self.timeOut = None
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.connections = connections
        self.protocol = self._new_channel  # type: ignore[method-assign, assignment]

    def _new_channel(self) -> HandshakeDeadlineChannel:
        return HandshakeDeadlineChannel(
            self.clock, self.handshake_timeout, self.connections, self.flow, self.listener
        )

    def log(self, request: http.Request) -> None:
        # Page loads are routine; keep them out of the info log.
        self.logger.debug(
            '{client} "{method} {uri}" {code}',
            client=describe(request.getClientAddress()),
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
            code=request.code,
        )

    def acceptableProtocols(self) -> list[bytes]:
        # ALPN: WebSocket (RFC 6455) needs HTTP/1.1; never h2 on this site.
        return [b"http/1.1"]


def make_site(
    bus: Bus,
    listener: StreamListenerConfig,
    limits: Limits,
    gateway_name: str,
    clock: IReactorTime,
    flow: FlowContext | None = None,
) -> WebSocketSite:
    """The web site of a ``ws`` or ``wss`` listener (wrap it in TLS for ``wss``)."""
    connections: set[_Closeable] = set()
    if flow is None:
        flow = FlowContext(limits, bus.metrics, clock)
    factory = WebSocketPeerFactory(bus, listener, limits, gateway_name, clock, connections, flow)
    root = _Root()  # type: ignore[no-untyped-call]
    for path, (name, content_type) in STATIC_FILES.items():
        root.putChild(path, StaticFile(_static(name), content_type))
    root.putChild(WEBSOCKET_PATH.strip("/").encode("ascii"), WebSocketResource(factory))
    site = WebSocketSite(root, clock, limits.handshake_timeout, connections, flow, listener.name)
    site.peer_factory = factory
    return site
