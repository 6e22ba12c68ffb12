"""The operator's HTTP listener: ``/healthz``, ``/metrics``, ``/peers``, ``/stats``,
``/channels``, and the actions ``POST /peers/<id>/close`` and ``POST /publish``; the
live page at ``/`` and its ``/events`` (``gateway.ops.live``).

Everything here is computed when it is asked for, from counters the hot path
keeps per batch; scraping costs the fan-out nothing. With ``[admin] token_sha256``
every request needs ``Authorization: Bearer <token>`` (``/healthz`` and
``/metrics`` not, with ``open_metrics``); actions need the token whatever the
bind address, so without one configured they are refused. Each action is
logged with who did it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gateway import __version__
from gateway.auth.credentials import token_matches
from gateway.config.settings import AdminSettings
from gateway.ops import actions, live
from gateway.ops.metrics import GatewayCollector, Health

MAX_PAGE = 10_000
MAX_SEARCH = 200
"""The longest ``/peers?q=`` text looked for (the rest is ignored)."""
MAX_BODY = 1 << 20
"""The largest request body an action reads (a message to publish)."""

Render = Callable[[Request], bytes]


class _Page(Resource):
    isLeaf = True

    def __init__(self, site: AdminSite, get: Render | None, post: Render | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._site = site
        self._get = get
        self._post = post

    def render_GET(self, request: Request) -> bytes:
        return self._site.guard(request, self._get, open_read=False)

    def render_POST(self, request: Request) -> bytes:
        return self._site.guard(request, self._post, action=True)


class AdminSite(Site):
    """``/healthz``, ``/metrics`` and ``/peers`` of one gateway."""

    noisy = False

    log_actions = Logger()

    def __init__(
        self, gateway: Health, reactor: Any, settings: AdminSettings | None = None
    ) -> None:
        self.gateway = gateway
        self.settings = settings or AdminSettings("127.0.0.1", 0)
        self.started = reactor.seconds()
        self.clock = reactor
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(GatewayCollector(gateway))
        root = Resource()
        root.putChild(b"healthz", _Open(self, self.healthz))
        root.putChild(b"metrics", _Open(self, self.metrics))
        root.putChild(b"peers", _Peers(self))
        root.putChild(b"stats", _Page(self, self.stats))
        root.putChild(b"channels", _Page(self, self.channels))
        root.putChild(b"publish", _Page(self, None, self.publish))
        live.add_page(root, self)
        super().__init__(root, reactor=reactor)  # type: ignore[no-untyped-call]

    def log(self, request: Any) -> None:
        """Scrapes are routine: no access log (actions log themselves)."""

    # Who may ask

    def guard(
        self, request: Request, render: Render | None, open_read: bool = False, action: bool = False
    ) -> bytes:
        """``render`` the answer if the request may have it: 401 without the token when one
        is set (``open_read``: /healthz, /metrics with ``open_metrics``), 403 for an action
        when no token is set, 405 for a method the path does not answer."""
        if render is None:
            request.setResponseCode(405)
            return _error(request, "method not allowed here")
        token = self.settings.token_sha256
        if token is None:
            if action:
                request.setResponseCode(403)
                return _error(request, "admin actions need [admin] token_sha256")
            return render(request)
        if open_read and self.settings.open_metrics:
            return render(request)
        if not self.authorized(request):
            return self.refuse(request)
        return render(request)

    def authorized(self, request: Request, query_token: bool = False) -> bool:
        """Whether ``request`` carries the admin token (always, when none is set): as
        ``Authorization: Bearer``, or with ``query_token`` as ``?token=`` (``/events``)."""
        token = self.settings.token_sha256
        if token is None:
            return True
        header = (request.getHeader("authorization") or "").strip()
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and token_matches(token, value.strip()):
            return True
        given = (request.args or {}).get(b"token") if query_token else None
        if not given:
            return False
        return token_matches(token, given[0].decode("utf-8", "replace"))

    def refuse(self, request: Request) -> bytes:
        """The 401 answer to a request without the token."""
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="gateway admin"')
        return _error(request, "a valid admin token is needed: Authorization: Bearer <token>")

    def _acted(self, request: Request, what: str) -> None:
        address: Any = request.getClientAddress()
        self.log_actions.info(
            "admin: {what} (by the admin token holder from {address})",
            what=what,
            address=getattr(address, "host", "?"),
        )

    def healthz(self, request: Request) -> bytes:
        """``ok``; or 503 with one line per problem (``backplane: down``, ``history: sqlite
        failing: ...``). The healthy body stays exactly ``ok``: checks compare it."""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        problems = self.gateway.problems()
        if problems:
            request.setResponseCode(503)
            return ("\n".join(problems) + "\n").encode("utf-8")
        return b"ok\n"

    def metrics(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.registry)

    def peers(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        try:
            offset = _query_int(request, b"offset", 0)
            limit = _query_int(request, b"limit", 1000)
        except ValueError as e:
            request.setResponseCode(400)
            return json.dumps({"error": str(e)}).encode()
        limit = min(limit, MAX_PAGE)
        bus = self.gateway.bus
        body: dict[str, Any] = {"total": bus.peer_count, "offset": offset, "limit": limit}
        search = (request.args or {}).get(b"q", [b""])[0].decode("utf-8", "replace").strip()
        if search:  # ?q=: the peers it matches, and how many
            found = actions.matching_peers(bus, search[:MAX_SEARCH])
            body["matched"] = len(found)
            body["peers"] = found[offset : offset + limit]
        else:
            body["peers"] = [bus.peer_info(peer) for peer in bus.attached(offset, limit)]
        return json.dumps(body).encode("utf-8")

    def stats(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        uptime = self.clock.seconds() - self.started
        return json.dumps(actions.stats(self.gateway.bus, uptime, __version__)).encode()

    def channels(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        try:
            limit = min(_query_int(request, b"limit", 100), MAX_PAGE)
        except ValueError as e:
            request.setResponseCode(400)
            return _error(request, str(e))
        return json.dumps(actions.channels(self.gateway.bus, limit)).encode("utf-8")

    def close_peer(self, request: Request, peer_id: str) -> bytes:
        peer = actions.find_peer(self.gateway.bus, peer_id)
        if peer is None:
            request.setResponseCode(404)
            return _error(request, f"no peer {peer_id!r}")
        self._acted(request, f"closed {peer_id}")
        self.gateway.bus.metrics.disconnect("admin")
        peer.close("closed by the operator")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"closed": peer_id}).encode("utf-8")

    def publish(self, request: Request) -> bytes:
        content = request.content
        data = content.read(MAX_BODY + 1) if content is not None else b""
        try:
            if len(data) > MAX_BODY:
                raise actions.PublishError(f"the body is over {MAX_BODY} bytes")
            try:
                body = json.loads(data)
            except (ValueError, RecursionError):
                raise actions.PublishError("the body is not JSON") from None
            limit = self.gateway.config.limits.max_message_bytes
            channel, reached = actions.publish(self.gateway.bus, body, limit)
        except actions.PublishError as e:
            request.setResponseCode(400)
            return _error(request, str(e))
        self._acted(request, f"published to {channel}")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"channel": channel, "reached": reached}).encode("utf-8")


class _Open(_Page):
    """/healthz and /metrics: open without the token when ``open_metrics`` says so."""

    def render_GET(self, request: Request) -> bytes:
        return self._site.guard(request, self._get, open_read=True)


class _Peers(Resource):
    """``GET /peers`` and ``POST /peers/<id>/close``."""

    isLeaf = True

    def __init__(self, site: AdminSite) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._site = site

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return _error(request, "no such page")
        return self._site.guard(request, self._site.peers)

    def render_POST(self, request: Request) -> bytes:
        path = request.postpath or []
        if len(path) != 2 or path[1] != b"close":
            return self._site.guard(request, None, action=True)
        peer_id = path[0].decode("utf-8", "replace")
        return self._site.guard(request, lambda r: self._site.close_peer(r, peer_id), action=True)


def _error(request: Request, reason: str) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": reason}).encode("utf-8")


def _query_int(request: Request, name: bytes, default: int) -> int:
    values = (request.args or {}).get(name)
    if not values:
        return default
    text = values[0].decode("ascii", "replace")
    if not text.isdigit():
        raise ValueError(f"{name.decode()} must be a non-negative integer, got {text!r}")
    return int(text)
