"""The HTTP side of a ``ws``/``wss`` listener: the page at ``/``, the WebSocket at ``/ws``.

Every HTTP connection counts against the connection caps from connect and must
send a whole request within ``handshake_timeout``; a WebSocket upgrade hands
the connection (and its place in the caps) over to the peer.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from gateway.config.listeners import WsListenerConfig
from gateway.config.settings import Limits
from gateway.transports.address import describe
from gateway.transports.listening import ListenerService
from gateway.transports.runtime import GatewayContext, ListenerRuntime
from gateway.transports.websocket.peer import WebSocketPeerFactory

WEBSOCKET_PATH = "/ws"


class HandshakeDeadlineChannel(HTTPChannel):
    """An HTTP connection that must send a complete request in time.

    The deadline runs from connect (and again after each response) until a
    whole request has arrived; a WebSocket upgrade is handled at once, and from
    then on Autobahn's own timeouts apply. Slow or silent clients are dropped.
    """

    logger = Logger()

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.runtime = runtime
        self.deadline_seconds = runtime.limits.handshake_timeout
        self._deadline: IDelayedCall | None = None
        self._admitted: str | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        remote = transport.getPeer()
        host = getattr(remote, "host", describe(remote))
        if not self.runtime.governor.gate.admit(host, self.runtime.name):
            transport.abortConnection()
            return
        self._admitted = host
        super().connectionMade()  # type: ignore[no-untyped-call]
        if ITCPTransport.providedBy(transport):
            transport.setTcpKeepAlive(True)
        self.runtime.connections.add(self)
        self._arm()

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()  # type: ignore[no-untyped-call]
        if self.transport is None:
            # A WebSocket took the connection over; it tracks (and releases) it now.
            self.runtime.connections.discard(self)
            self._admitted = None

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if self.transport is not None:
            self._arm()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._disarm()
        self.runtime.connections.discard(self)
        if self._admitted is not None:
            self.runtime.governor.gate.release(self._admitted)
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
        self._deadline = self.runtime.clock.callLater(self.deadline_seconds, self._expired)

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


class SignInInfo(Resource):
    """``/signin.json``: how the page may sign in on this listener (read at each request, so a
    reload shows): ``{"methods": [...], "anonymous": bool}``; no methods: no sign-in."""

    isLeaf = True

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.runtime = runtime

    def render_GET(self, request: Request) -> bytes:
        config = self.runtime.config
        page_methods = [m for m in config.auth if m in ("password", "token", "jwt")]
        body = {"methods": page_methods, "anonymous": config.anonymous_role is not None}
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return json.dumps(body).encode()


STATIC_FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"style.css": ("style.css", b"text/css; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


class WebSocketSite(Site):
    """The site of one ``ws``/``wss`` listener: the page at ``/``, the WebSocket at ``/ws``."""

    noisy = False
    logger = Logger()

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.peer_factory = WebSocketPeerFactory(runtime, counted=True, path=WEBSOCKET_PATH)
        root = _Root()  # type: ignore[no-untyped-call]
        for path, (name, content_type) in STATIC_FILES.items():
            root.putChild(path, StaticFile(_static(name), content_type))
        root.putChild(b"signin.json", SignInInfo(runtime))
        root.putChild(
            WEBSOCKET_PATH.strip("/").encode("ascii"), WebSocketResource(self.peer_factory)
        )
        super().__init__(root, reactor=runtime.clock)  # type: ignore[no-untyped-call]
        # The channels' own deadline replaces Twisted's idle timeout.
        self.timeOut = None
        self.protocol = self._new_channel  # type: ignore[method-assign, assignment]

    def _new_channel(self) -> HandshakeDeadlineChannel:
        return HandshakeDeadlineChannel(self.runtime)

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


class WebSocketListener(ListenerService):
    """A ``ws`` or ``wss`` listener."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__(runtime)
        self.site = WebSocketSite(runtime)

    def protocol_factory(self) -> WebSocketSite:
        return self.site

    def configure(self) -> None:
        self.site.peer_factory.configure()


def build(config: WsListenerConfig, limits: Limits, context: GatewayContext) -> WebSocketListener:
    return WebSocketListener(ListenerRuntime(config, limits, context))
