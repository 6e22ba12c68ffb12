"""The operator's HTTP listener: ``/healthz``, ``/metrics`` and ``/peers``.

Everything here is computed when it is asked for, from counters the hot path
keeps per batch; scraping costs the fan-out nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gateway.ops.metrics import GatewayCollector, Health

MAX_PAGE = 10_000


class _Page(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Request], bytes]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        return self._render(request)


class AdminSite(Site):
    """``/healthz``, ``/metrics`` and ``/peers`` of one gateway."""

    noisy = False

    def __init__(self, gateway: Health, reactor: Any) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(GatewayCollector(gateway))
        root = Resource()
        root.putChild(b"healthz", _Page(self.healthz))
        root.putChild(b"metrics", _Page(self.metrics))
        root.putChild(b"peers", _Page(self.peers))
        super().__init__(root, reactor=reactor)  # type: ignore[no-untyped-call]

    def log(self, request: Any) -> None:
        """Scrapes are routine: no access log."""

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
        page = [bus.peer_info(peer) for peer in bus.attached(offset, limit)]
        body = {"total": bus.peer_count, "offset": offset, "limit": limit, "peers": page}
        return json.dumps(body).encode("utf-8")


def _query_int(request: Request, name: bytes, default: int) -> int:
    values = (request.args or {}).get(name)
    if not values:
        return default
    text = values[0].decode("ascii", "replace")
    if not text.isdigit():
        raise ValueError(f"{name.decode()} must be a non-negative integer, got {text!r}")
    return int(text)
