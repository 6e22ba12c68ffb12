"""The live admin page against the real gateway: its files under the client page's
Content-Security-Policy, the ``/events`` stream, and the page in headless Chromium
(the token prompt, a tcp peer in the table, its Disconnect button; the channels and node
health panels of a cluster node, and the peers table paging through ``/peers``)."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from typing import Any

import pytest
from playwright.sync_api import expect

import tests.test_browser as browser_tests
from gateway import __version__
from gateway.auth.credentials import token_digest
from gateway.ops.live import MAX_EVENT_STREAMS
from tests.conftest import TIMEOUT, GatewayProcess, Line, RedisServer
from tests.test_admin_api import TOKEN, call, config
from tests.toml import toml_listener, toml_table

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
    # The disconnects chart shows the operator's close (reason "admin").
    expect(page.locator("#legend-disconnects")).to_contain_text("admin")
    # The 401 of the first /stats is the only error: nothing broke the policy.
    assert [p for p in problems if "401" not in p] == []


@pytest.mark.skipif(not browser_tests.CHROMIUM.exists(), reason="no Debian chromium")
@pytest.mark.timeout(60)
def test_the_charts_and_the_peer_rates_move_while_traffic_flows(run_gateway, chromium):
    gw = run_gateway(config(), listeners=3)
    sender, receiver = Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    assert sender.line() == b"hi tcp-1" and receiver.line() == b"hi tcp-2"
    page = browser_tests.new_page(chromium())
    page.goto(f"http://127.0.0.1:{gw.ports['admin']}/")
    page.locator("#token").fill(TOKEN)
    page.locator("#token").press("Enter")
    expect(page.locator("#status")).to_have_text("Live")
    rates = page.locator("#legend-rates .key")
    expect(rates.first).to_have_text("in/s 0")  # quiet: a flat line at 0
    line = page.locator("#chart-rates polyline").first
    quiet = line.get_attribute("points")
    flowing = threading.Event()
    done = threading.Event()

    def chatter() -> None:  # about 50 messages a second until the page has seen them
        while not done.wait(0.02):
            sender.send(b"tick\n")
            flowing.set()

    thread = threading.Thread(target=chatter)
    thread.start()
    try:
        assert flowing.wait(TIMEOUT)
        nonzero = re.compile(r" (?!0$)\d")  # a rate that is not 0
        expect(rates.nth(0)).to_have_text(re.compile(r"^in/s \d"))
        expect(rates.nth(0)).to_contain_text(nonzero)
        expect(rates.nth(1)).to_contain_text(nonzero)  # delivered/s: to tcp-2
        expect(page.locator("#legend-bytes .key").nth(0)).to_contain_text(nonzero)
        expect(line).not_to_have_attribute("points", quiet or "")
        cells = page.locator('#peers tr[data-peer="tcp-1"] td')
        expect(cells.nth(7)).to_have_text(re.compile(r"^(?!0$)\d"))  # In/s of the sender
        expect(page.locator('#peers tr[data-peer="tcp-2"] td').nth(9)).to_have_text(
            re.compile(r"^(?!0$)\d")  # Out/s of the receiver
        )
        expect(cells.nth(9)).to_have_text("0")  # the sender gets nothing back
    finally:
        done.set()
        thread.join()
    # Traffic stops: the rates fall back to 0 with the next events.
    expect(rates.nth(0)).to_have_text(re.compile(r"^in/s 0$"))
    expect(page.locator('#peers tr[data-peer="tcp-1"] td').nth(7)).to_have_text("0")


DASH = "\N{EN DASH}"  # between the first and last numbers of the pager
ROOM_PEERS = 104
"""Peers on the ``room`` listener: with the one on ``tcp``, more than one page of 100."""


def cluster_node(redis_server: RedisServer) -> str:
    """A cluster node ``n1`` with a ``tcp`` listener on ``main`` and ``room`` on ``room.1``."""
    return (
        toml_table("admin", port=0, token_sha256=token_digest(TOKEN))
        + toml_table("cluster", redis=redis_server.url, node="n1", prefix="page")
        + toml_listener("tcp")
        + toml_listener("room", "tcp", channel="room.1")
    )


def wait_for_peers(gw: GatewayProcess, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while call(gw, "/stats")[1]["peers"] != count:
        assert time.monotonic() < deadline, f"never {count} peers"
        time.sleep(0.05)


def test_events_carry_the_channels_and_the_node(run_gateway, redis_server):
    gw = run_gateway(cluster_node(redis_server), listeners=3)
    gw.wait_for("backplane up")
    peers = [Line(gw.ports["tcp"]), Line(gw.ports["room"]), Line(gw.ports["room"])]
    try:
        wait_for_peers(gw, 3)
        peers[1].send(b"hello\n")
        assert peers[2].line() == b"hello"
        [event] = events(gw, f"?token={TOKEN}", 1)
    finally:
        for peer in peers:
            peer.close()
    assert event["channels"] == {
        "total": 2,
        "limit": 20,
        "channels": [
            {"channel": "room.1", "subscribers": 2},
            {"channel": "main", "subscribers": 1},
        ],
    }
    node = event["node"]
    assert node["name"] == "gateway" and node["workers"] == 1
    assert [(x["name"], x["type"], x["up"]) for x in node["listeners"]] == [
        ("tcp", "tcp", True),
        ("room", "tcp", True),
    ]
    assert node["backplane"] == {"node": "n1", "prefix": "page", "up": True, "unforwarded": 0}
    assert node["history"] == {"store": "memory", "problem": None, "unwritten": 0}
    assert redis_server.url not in json.dumps(event)  # a Redis URL may hold its password
    assert event["stats"]["bytes_received"] == event["stats"]["bytes_delivered"] == 5


@pytest.mark.skipif(not browser_tests.CHROMIUM.exists(), reason="no Debian chromium")
@pytest.mark.timeout(90)
def test_the_page_shows_channels_node_health_and_pages_all_peers(
    run_gateway, redis_server, chromium
):
    gw = run_gateway(cluster_node(redis_server), listeners=3)
    gw.wait_for("backplane up")
    peers = [Line(gw.ports["tcp"])] + [Line(gw.ports["room"]) for _ in range(ROOM_PEERS)]
    try:
        wait_for_peers(gw, 1 + ROOM_PEERS)
        page = browser_tests.new_page(chromium())
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.goto(f"http://127.0.0.1:{gw.ports['admin']}/")
        page.locator("#token").fill(TOKEN)
        page.locator("#token").press("Enter")
        expect(page.locator("#status")).to_have_text("Live")

        channels = page.locator("#channels tbody tr")
        expect(channels).to_have_count(2)
        expect(channels.nth(0).locator("td").nth(0)).to_have_text("room.1")
        expect(channels.nth(0).locator("td").nth(1)).to_have_text(str(ROOM_PEERS))
        expect(channels.nth(1).locator("td").nth(0)).to_have_text("main")
        expect(channels.nth(1).locator("td").nth(1)).to_have_text("1")
        expect(page.locator("#channels-total")).to_contain_text("2 with subscribers")

        expect(page.locator("#health")).to_have_text("ok")
        node = page.locator("#node")
        expect(node.locator('dd[data-item="Version"]')).to_have_text(__version__)
        expect(node.locator('dd[data-item="Backplane"]')).to_contain_text("up, node n1")
        expect(node.locator('dd[data-item="History store"]')).to_have_text("memory: ok")
        expect(node.locator('dd[data-item="Uptime"]')).to_have_text(re.compile(r"\d+ s"))
        for name in ("tcp", "room"):
            row = page.locator(f'#listeners tr[data-listener="{name}"]')
            expect(row.locator("td").nth(3)).to_have_text("listening")
        expect(page.locator('#totals dd[data-item="Peers"]')).to_have_text(str(1 + ROOM_PEERS))

        rows = page.locator("#peers tbody tr")
        expect(rows).to_have_count(50)  # the busiest 50
        expect(page.locator("#pager")).to_be_hidden()
        page.locator("#view").select_option("all")
        expect(page.locator("#page")).to_have_text(f"1{DASH}100 of {1 + ROOM_PEERS}")
        expect(rows).to_have_count(100)
        expect(page.locator("#previous")).to_be_disabled()
        page.locator("#next").click()
        expect(page.locator("#page")).to_have_text(f"101{DASH}{1 + ROOM_PEERS} of {1 + ROOM_PEERS}")
        expect(rows).to_have_count(1 + ROOM_PEERS - 100)
        expect(page.locator("#next")).to_be_disabled()
        last = f"room-{ROOM_PEERS}"  # joined last: on the last page
        expect(page.locator(f'#peers tr[data-peer="{last}"]')).to_have_count(1)
        # A peer leaving is seen on the page (it is refreshed with every event).
        peers.pop().close()
        expect(page.locator("#page")).to_have_text(f"101{DASH}{ROOM_PEERS} of {ROOM_PEERS}")
        expect(page.locator(f'#peers tr[data-peer="{last}"]')).to_have_count(0)
        page.locator("#previous").click()
        expect(page.locator("#page")).to_have_text(f"1{DASH}100 of {ROOM_PEERS}")
        # The search of All looks through every peer, not just the page shown.
        page.locator("#search").fill("room-10")
        expect(page.locator("#page")).to_have_text(f"1{DASH}5 of 5 matching")
        found = [f"room-10{n}" for n in ("", "0", "1", "2", "3")]  # room-10x: on page 2
        expect(rows).to_have_count(len(found))
        for peer_id in found:
            expect(page.locator(f'#peers tr[data-peer="{peer_id}"]')).to_have_count(1)
        page.locator("#search").fill("")
        expect(page.locator("#page")).to_have_text(f"1{DASH}100 of {ROOM_PEERS}")
        page.locator("#view").select_option("busiest")
        expect(rows).to_have_count(50)
        expect(page.locator("#pager")).to_be_hidden()
        assert [p for p in problems if "401" not in p] == []
    finally:
        for peer in peers:
            peer.close()
    assert TOKEN not in "\n".join(gw.log)
