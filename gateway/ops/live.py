"""The live admin page: its files at ``/``, ``/admin.js`` and ``/admin.css``, and
``/events``, a server-sent event stream of the gateway's numbers once a second.

The page's files hold no data and are served without the token, under the client
page's Content-Security-Policy. Every stream needs the token like the other data
pages; as ``EventSource`` cannot set headers, ``/events`` also takes it as
``?token=`` (never logged: the admin site keeps no access log). At most
``MAX_EVENT_STREAMS`` streams run at once; each stops when its client goes.
"""

from __future__ import annotations

import heapq
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from twisted.internet import task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gateway import __version__
from gateway.ops import actions
from gateway.transports.websocket.site import StaticFile

if TYPE_CHECKING:
    from gateway.ops.admin import AdminSite

MAX_EVENT_STREAMS = 16
"""How many ``/events`` streams may run at once; one more is answered ``503``."""
EVENT_INTERVAL = 1.0
"""Seconds between two events of one stream."""
TOP_PEERS = 50
"""How many peers an event lists: the busiest by messages out."""
TOP_CHANNELS = 20
"""How many channels an event lists: the most subscribed."""

PAGE_FILES = {
    b"": ("admin.html", b"text/html; charset=utf-8"),
    b"admin.js": ("admin.js", b"text/javascript; charset=utf-8"),
    b"admin.css": ("admin.css", b"text/css; charset=utf-8"),
}


def add_page(root: Resource, site: AdminSite) -> None:
    """Put the page's files and ``/events`` under ``root``."""
    for path, (name, content_type) in PAGE_FILES.items():
        body = resources.files("gateway").joinpath("static", name).read_bytes()
        root.putChild(path, StaticFile(body, content_type))
    root.putChild(b"events", EventStreams(site))


def snapshot(site: AdminSite) -> dict[str, Any]:
    """One event: ``/stats``, the busiest peers, the most subscribed channels, the node's
    health (its problems and its parts), the server's time."""
    bus = site.gateway.bus
    now = site.clock.seconds()
    infos = [info for peer in bus.attached() if (info := bus.peer_info(peer)) is not None]
    busiest = heapq.nlargest(TOP_PEERS, infos, key=lambda info: _number(info["messages_out"]))
    problems = site.gateway.problems()
    return {
        "time": now,
        "stats": actions.stats(bus, now - site.started, __version__),
        "peers": [{key: info[key] for key in _PEER_KEYS if key in info} for info in busiest],
        "channels": actions.channels(bus, TOP_CHANNELS),
        "problems": problems,
        "node": node(site, problems),
    }


def node(site: AdminSite, problems: list[str]) -> dict[str, Any]:
    """The node's parts and their state: its listeners (as configured; down when
    ``problems`` says so), the cluster backplane, the history store. No secret: the
    Redis URL, which may hold a password, is left out."""
    gateway = site.gateway
    config = gateway.config
    listeners = [
        {
            "name": listener.name,
            "type": listener.type,
            "host": listener.host,
            "port": listener.port,
            "up": f"listener {listener.name}: not listening" not in problems,
        }
        for listener in config.listeners
    ]
    backplane: dict[str, Any] | None = None
    state = gateway.backplane_state()
    if config.cluster is not None and state is not None:
        backplane = {
            "node": config.cluster.node,
            "prefix": config.cluster.prefix,
            "up": state[0],
            "unforwarded": state[1],
        }
    kind, problem, unwritten = gateway.history_state()
    return {
        "name": config.gateway.name,
        "workers": config.gateway.workers,
        "listeners": listeners,
        "backplane": backplane,
        "history": {"store": kind, "problem": problem, "unwritten": unwritten},
    }


_PEER_KEYS = (
    "id",
    "transport",
    "listener",
    "user",
    "tls_subject",
    "address",
    "connected_since",
    "messages_in",
    "messages_out",
    "pending_bytes",
)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


class EventStreams(Resource):
    """``GET /events``: ``text/event-stream``, one ``data: <json>`` event per second."""

    isLeaf = True
    log = Logger()

    def __init__(self, site: AdminSite) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._site = site
        self.streams: set[Request] = set()

    def render_GET(self, request: Request) -> bytes | int:
        site = self._site
        if not site.authorized(request, query_token=True):
            return site.refuse(request)
        if len(self.streams) >= MAX_EVENT_STREAMS:
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"5")
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": "too many event streams"}'
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        self.streams.add(request)
        loop = task.LoopingCall(self._send, request)
        loop.clock = site.clock
        running = loop.start(EVENT_INTERVAL, now=True)
        running.addErrback(self._failed, request)

        def finished(_: object) -> None:
            self.streams.discard(request)
            if loop.running:
                loop.stop()

        request.notifyFinish().addBoth(finished)
        return NOT_DONE_YET

    def _send(self, request: Request) -> None:
        if request.finished or request.channel is None:
            return
        body = json.dumps(snapshot(self._site), separators=(",", ":"))
        request.write(b"data: " + body.encode("utf-8") + b"\n\n")

    def _failed(self, failure: Failure, request: Request) -> None:
        self.log.failure("an admin event stream failed; ending it", failure)
        self.streams.discard(request)
        if not request.finished and request.channel is not None:
            request.finish()
