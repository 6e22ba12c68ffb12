"""The live admin page against the real gateway: its files under the client page's
Content-Security-Policy, the ``/events`` stream, and the page in headless Chromium
(the token prompt, a tcp peer in the table, its Disconnect button)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest
from playwright.sync_api import expect

import tests.test_browser as browser_tests
from gateway.ops.live import MAX_EVENT_STREAMS
from tests.conftest import TIMEOUT, GatewayProcess, Line
from tests.test_admin_api import TOKEN, call, config

chromium = browser_tests.chromium
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


def events(gw: GatewayProcess, query: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` events of one ``/events`` stream (read with a timeout)."""
    connection = http.client.HTTPConnection("127.0.0.1", gw.ports["admin"], timeout=3)
    try:
        connection.request("GET", "/events" + query)
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        found: list[dict[str, Any]] = []
        while len(found) < count:
            line = response.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                found.append(json.loads(line[6:]))
        return found
    finally:
        connection.close()


def status(gw: GatewayProcess, path: str, token: str | None = TOKEN) -> int:
    """The status of one GET (a stream's body is not read)."""
    connection = http.client.HTTPConnection("127.0.0.1", gw.ports["admin"], timeout=3)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_page_is_served_without_the_token_under_the_strict_policy(run_gateway):
    gw = run_gateway(config(), listeners=3)
    for path, kind in (("/", "text/html"), ("/admin.js", "text/javascript")):
        code, _, headers = call(gw, path, token=None)
        assert code == 200, path
        assert headers["Content-Type"].startswith(kind)
        assert headers["Content-Security-Policy"] == CSP
    assert '<script src="admin.js"' in call(gw, "/", token=None)[1]
    assert call(gw, "/admin.css", token=None)[0] == 200


def test_events_need_the_token_and_stream_the_numbers_every_second(run_gateway):
    gw = run_gateway(config(), listeners=3)
    tcp = Line(gw.ports["tcp"])
    assert tcp.line() == b"hi tcp-1"
    tcp.send(b"hello\n")
    assert status(gw, "/events", token=None) == 401
    assert status(gw, "/events?token=wrong", token=None) == 401
    started = time.monotonic()
    first, second = events(gw, f"?token={TOKEN}", 2)
    assert time.monotonic() - started < 3
    assert 0.5 < second["time"] - first["time"] < 2
    assert second["stats"]["connections"] == {"tcp": 1}
    assert second["stats"]["messages_received"] == 1
    assert second["problems"] == []
    [peer] = second["peers"]
    assert peer["id"] == "tcp-1" and peer["transport"] == "tcp" and peer["messages_in"] == 1
    assert TOKEN not in "\n".join(gw.log)


def test_event_streams_are_bounded(run_gateway):
    gw = run_gateway(config(), listeners=3)
    streams = []
    try:
        for _ in range(MAX_EVENT_STREAMS):
            connection = http.client.HTTPConnection("127.0.0.1", gw.ports["admin"], timeout=3)
            connection.request("GET", "/events", headers={"Authorization": f"Bearer {TOKEN}"})
            assert connection.getresponse().status == 200
            streams.append(connection)
        assert status(gw, "/events") == 503
    finally:
        for connection in streams:
            connection.close()
    # Closed streams give their places back (once the gateway notices them gone).
    deadline = time.monotonic() + TIMEOUT
    while status(gw, "/events") == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert events(gw, f"?token={TOKEN}", 1)


@pytest.mark.skipif(not browser_tests.CHROMIUM.exists(), reason="no Debian chromium")
@pytest.mark.timeout(60)
def test_the_page_asks_for_the_token_and_disconnects_a_tcp_peer(run_gateway, chromium):
    gw = run_gateway(config(), listeners=3)
    tcp = Line(gw.ports["tcp"])
    assert tcp.line() == b"hi tcp-1"
    page = browser_tests.new_page(chromium())
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(f"http://127.0.0.1:{gw.ports['admin']}/")
    expect(page.locator("#signin")).to_be_visible()
    page.locator("#token").fill(TOKEN)
    page.locator("#token").press("Enter")
    expect(page.locator("#status")).to_have_text("Live")
    row = page.locator('#peers tr[data-peer="tcp-1"]')
    expect(row.locator("td").first).to_have_text("tcp-1")
    expect(page.locator("#health")).to_have_text("ok")
    expect(page.locator("#chart-rates polyline")).to_have_count(2)
    expect(page.locator("#chart-connections polyline")).to_have_count(1)
    browser_tests.screenshot(page, "admin-page.png")
    row.get_by_role("button", name="Disconnect").click()
    assert tcp.closed()
    expect(row).to_have_count(0)
    gw.wait_for(r"admin: closed tcp-1 \(by the admin token holder")
    # The 401 of the first /stats is the only error: nothing broke the policy.
    assert [p for p in problems if "401" not in p] == []
