"""The browser page in a real headless Chromium (Debian's, driven by Playwright for Python).

The gateway is the real ``gateway --config`` command with tcp, ws, wss and udp listeners;
the other peers are real sockets (``Line``, ``Datagram``) and the ``websockets`` client.
Screenshots go to ``tests/artifacts/`` for a reviewer to open.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from playwright.sync_api import Browser, Error, Page, expect, sync_playwright

from tests.conftest import (
    JSON_SUBPROTOCOL,
    TIMEOUT,
    Datagram,
    GatewayProcess,
    Line,
    free_port,
    make_certs,
    websocket,
    ws_url,
)
from tests.toml import toml_listener, toml_table

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A dev PKI made by the real ``gateway certs`` command."""
    folder = tmp_path / "certs"
    make_certs(folder)
    return folder


def gateway_config(certs: Path) -> str:
    return (
        toml_listener("tcp")
        + toml_listener("ws")
        + toml_listener("wss", certs=certs)
        + toml_listener("udp")
    )


@pytest.fixture
def gateway(run_gateway, certs: Path) -> GatewayProcess:
    gw: GatewayProcess = run_gateway(gateway_config(certs))
    return gw


@pytest.fixture
def chromium() -> Iterator[Callable[..., Browser]]:
    """Launch Debian's Chromium (never a downloaded one); every browser is closed at the end.

    Each launch gets a fresh temporary profile (Playwright's own ``--user-data-dir``).
    """
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browsers: list[Browser] = []

        def launch(*extra_args: str) -> Browser:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[*CHROMIUM_ARGS, *extra_args],
                timeout=WAIT_MS * 3,
            )
            browsers.append(browser)
            return browser

        try:
            yield launch
        finally:
            for browser in browsers:
                if browser.is_connected():
                    browser.close()


def new_page(browser: Browser) -> Page:
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.set_default_timeout(WAIT_MS)
    return page


def wait_connected(page: Page) -> str:
    """Wait for the page's WebSocket welcome; return the page's own peer id."""
    expect(page.locator("#status")).to_have_text("Connected")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    expect(page.locator("#message")).to_be_enabled()
    me = page.locator("#me")
    expect(me).to_have_text(re.compile(r"^as \S+$"))
    return me.inner_text().removeprefix("as ")


def browser_says(page: Page, text: str) -> None:
    """Type a line in the box and press Enter, as a person would."""
    page.locator("#message").fill(text)
    page.locator("#message").press("Enter")
    expect(page.locator("#message")).to_have_value("")


def expect_message(page: Page, text: str, who: str, via: str) -> None:
    """The log holds exactly one message ``text``, labelled with its sender and transport."""
    entry = page.locator("#log li.message").filter(
        has=page.locator(".text", has_text=re.compile("^" + re.escape(text) + "$"))
    )
    expect(entry).to_have_count(1)
    expect(entry.locator(".who")).to_have_text(who)
    expect(entry.locator(".via")).to_have_text(via)


def expect_online(page: Page, count: int, by_transport: dict[str, int]) -> None:
    expect(page.locator("#count")).to_have_text(str(count))
    expect(page.locator("#online li")).to_have_text(
        [f"{transport}{n}" for transport, n in sorted(by_transport.items())]
    )


def peer_ids(gw: GatewayProcess, pattern: str, count: int = 1) -> list[str]:
    """Peer ids from the gateway's log, once ``count`` lines match ``pattern``."""
    gw.wait_count(pattern, count)
    return [m.group(1) for line in list(gw.log) if (m := re.search(pattern, line))]


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    return path


def test_ws_page_talks_with_tcp_udp_and_websocket_peers(gateway, chromium):
    gw = gateway
    port = gw.ports["ws"]
    page = new_page(chromium())
    page.goto(f"http://127.0.0.1:{port}/")
    me = wait_connected(page)
    assert re.fullmatch(r"ws-\d+", me)
    expect_online(page, 1, {"ws": 1})

    tcp = Line(gw.ports["tcp"])
    expect_online(page, 2, {"tcp": 1, "ws": 1})
    (tcp_id,) = peer_ids(gw, r"(tcp-\d+) connected from")
    expect(page.locator("#log")).to_contain_text(f"{tcp_id} joined via tcp")

    with websocket(gw) as other:
        expect_online(page, 3, {"tcp": 1, "ws": 2})
        (other_id,) = [p for p in peer_ids(gw, r"(ws-\d+) connected from", 2) if p != me]

        udp = Datagram(gw.ports["udp"])
        udp.send(b"hello from udp")
        (udp_id,) = peer_ids(gw, r"(udp-\d+) joined from")
        expect_message(page, "hello from udp", udp_id, "udp")
        expect_online(page, 4, {"tcp": 1, "udp": 1, "ws": 2})
        assert tcp.line() == b"hello from udp"
        assert other.recv(timeout=TIMEOUT) == "hello from udp"

        browser_says(page, "hello from chromium")
        assert tcp.line() == b"hello from chromium"
        # Outbound UDP is one datagram per message, payload then "\n" (docs/protocol.md).
        assert udp.recv() == b"hello from chromium\n"
        assert other.recv(timeout=TIMEOUT) == "hello from chromium"
        expect_message(page, "hello from chromium", f"you ({me})", "ws")

        tcp.send(b"hello from tcp\n")
        expect_message(page, "hello from tcp", tcp_id, "tcp")
        assert other.recv(timeout=TIMEOUT) == "hello from tcp"
        assert udp.recv() == b"hello from tcp\n"

        other.send("hello from a websockets client")
        expect_message(page, "hello from a websockets client", other_id, "ws")
        assert tcp.line() == b"hello from a websockets client"
        assert udp.recv() == b"hello from a websockets client\n"

        expect_online(page, 4, {"tcp": 1, "udp": 1, "ws": 2})
        screenshot(page, "browser-ws.png")

    # The websockets client left: the page hears it.
    expect(page.locator("#log")).to_contain_text(f"{other_id} left")
    expect_online(page, 3, {"tcp": 1, "udp": 1, "ws": 1})
    tcp.close()
    udp.close()


def spki_sha256(cert_pem: Path) -> str:
    """Base64 SHA-256 of a certificate's SubjectPublicKeyInfo, as Chromium's flag wants it."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def tls_handshakes(netlog: Path, port: int) -> list[dict[str, Any]]:
    """The end of every TLS handshake Chromium made to ``127.0.0.1:port``, from its NetLog."""
    log = json.loads(netlog.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    phase_end = log["constants"]["logEventPhase"]["PHASE_END"]
    to_port: set[int] = set()
    handshakes: list[tuple[int, dict[str, Any]]] = []
    for event in log["events"]:
        name, params = names[event["type"]], event.get("params") or {}
        if event.get("phase") != phase_end:
            continue
        if name == "TCP_CONNECT" and params.get("remote_address") == f"127.0.0.1:{port}":
            to_port.add(event["source"]["id"])
        elif name == "SSL_CONNECT":
            handshakes.append((event["source"]["id"], params))
    return [params for source, params in handshakes if source in to_port]


def test_wss_page_trusts_the_dev_certificate_and_negotiates_alpn(
    gateway, chromium, certs, tmp_path
):
    gw = gateway
    port = gw.ports["wss"]
    url = f"https://localhost:{port}/"

    # Without being told about the dev certificate, Chromium refuses it.
    plain = new_page(chromium())
    with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
        plain.goto(url)

    netlog = tmp_path / "netlog.json"
    browser = chromium(
        f"--ignore-certificate-errors-spki-list={spki_sha256(certs / 'server.pem')}",
        f"--log-net-log={netlog}",
    )
    page = new_page(browser)
    response = page.goto(url)
    assert response is not None
    assert response.ok
    security = response.security_details()
    assert security is not None
    assert security.get("protocol") in ("TLS 1.2", "TLS 1.3")
    assert security.get("subjectName") == "localhost"
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert security.get("issuer") == ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    me = wait_connected(page)
    assert re.fullmatch(r"wss-\d+", me)
    gw.wait_for(rf"{me} connected from 127\.0\.0\.1:")
    expect_online(page, 1, {"wss": 1})

    tcp = Line(gw.ports["tcp"])
    expect_online(page, 2, {"tcp": 1, "wss": 1})
    (tcp_id,) = peer_ids(gw, r"(tcp-\d+) connected from")

    browser_says(page, "hello over wss")
    assert tcp.line() == b"hello over wss"
    expect_message(page, "hello over wss", f"you ({me})", "wss")
    tcp.send(b"hello back over tcp\n")
    expect_message(page, "hello back over tcp", tcp_id, "tcp")
    screenshot(page, "browser-wss.png")
    tcp.close()

    # Closing the browser completes its NetLog: every handshake with the gateway settled on
    # http/1.1 by ALPN (Chromium always offers h2 and http/1.1 on https and wss).
    browser.close()
    handshakes = tls_handshakes(netlog, port)
    assert handshakes, "no TLS handshake to the gateway in Chromium's NetLog"
    for params in handshakes:
        assert params.get("next_proto") == "http/1.1", params
        assert params.get("version") in ("TLS 1.2", "TLS 1.3"), params
    assert not [line for line in gw.log if "failed the handshake" in line]


def test_page_loads_nothing_from_other_origins(gateway, chromium):
    gw = gateway
    port = gw.ports["ws"]
    origin = f"http://127.0.0.1:{port}"
    context = chromium().new_context()
    requests: list[str] = []
    failed: list[str] = []
    sockets: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    context.on("requestfailed", lambda request: failed.append(f"{request.url}: {request.failure}"))
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.on("websocket", lambda ws: sockets.append(ws.url))

    response = page.goto(origin + "/")
    assert response is not None
    assert response.ok
    policy = response.headers.get("content-security-policy", "")
    assert "default-src 'none'" in policy
    assert response.headers.get("x-content-type-options") == "nosniff"
    wait_connected(page)
    tcp = Line(gw.ports["tcp"])
    expect_online(page, 2, {"tcp": 1, "ws": 1})
    browser_says(page, "anything external?")
    assert tcp.line() == b"anything external?"
    tcp.send(b"nothing external\n")
    expect_message(page, "nothing external", peer_ids(gw, r"(tcp-\d+) connected from")[0], "tcp")
    page.wait_for_load_state("networkidle")

    # data: URLs (the page's empty favicon) load nothing from anywhere.
    network = [url for url in requests if not url.startswith("data:")]
    outside = [url for url in network if not url.startswith(origin + "/")]
    assert not outside, f"requests to other origins: {outside}"
    assert {urlsplit(url).path for url in network} == {"/", "/app.js", "/style.css", "/signin.json"}
    assert sockets == [ws_url(gw)]
    assert not failed
    # The page's own account of what it loaded agrees.
    loaded = page.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
    assert all(name.startswith(origin + "/") for name in loaded), loaded
    tcp.close()


def test_page_joins_and_leaves_channels_and_sends_to_a_chosen_one(run_gateway, chromium):
    gw = run_gateway(
        toml_listener("one", "tcp", channel="room.1")
        + toml_listener("two", "tcp", channel="room.2")
        + toml_listener("ws")
    )
    page = new_page(chromium())
    page.goto(f"http://127.0.0.1:{gw.ports['ws']}/")
    wait_connected(page)
    expect(page.locator("#channels li .name")).to_have_text(["main"])
    one, two = Line(gw.ports["one"]), Line(gw.ports["two"])
    (one_id, two_id) = peer_ids(gw, r"((?:one|two)-\d+) connected from", 2)

    for channel in ("room.1", "room.2"):
        page.locator("#channel").fill(channel)
        page.locator("#channel").press("Enter")
    expect(page.locator("#channels li .name")).to_have_text(["main", "room.1", "room.2"])

    one.send(b"in room 1\n")
    expect_message(page, "in room 1", one_id, "tcp")
    entry = page.locator("#log li.message").filter(has_text="in room 1")
    expect(entry.locator(".channel")).to_have_text("room.1")

    page.locator("#target").select_option("room.2")
    browser_says(page, "to room 2")
    assert two.line() == b"to room 2"
    assert one.nothing_within(0.3)

    page.get_by_role("button", name="Leave room.1").click()
    expect(page.locator("#channels li .name")).to_have_text(["main", "room.2"])
    one.send(b"after leaving\n")
    two.send(b"still in room 2\n")
    expect_message(page, "still in room 2", two_id, "tcp")
    expect(page.locator("#log li.message").filter(has_text="after leaving")).to_have_count(0)

    page.locator("#channel").fill("a..b")
    page.locator("#channel").press("Enter")
    expect(page.locator("#channel-error")).to_contain_text("not a channel name or pattern")
    screenshot(page, "browser-channels.png")


def test_page_signs_in_with_a_form_and_never_keeps_the_password(run_gateway, chromium):
    from gateway.auth.credentials import hash_password

    password = "page password 42"
    gw = run_gateway(
        '\n[roles.member]\npublish = ["main"]\nsubscribe = ["main"]\n'
        f'\n[auth.users.alice]\npassword = "{hash_password(password)}"\nroles = ["member"]\n'
        + toml_listener("tcp", auth=["password"])
        + toml_listener("ws", auth=["password"])
    )
    page = new_page(chromium())
    page.goto(f"http://127.0.0.1:{gw.ports['ws']}/")
    form = page.locator("#signin")
    expect(form).to_be_visible()
    expect(page.locator("#message")).to_be_disabled()
    page.locator("#user").fill("alice")
    page.locator("#password").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("Sign-in failed")
    expect(page.locator("#password")).to_have_value("")  # never kept in the page

    page.locator("#password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#status")).to_have_text("Connected")
    expect(page.locator("#me")).to_have_text(re.compile(r"^as ws-\d+ \(alice\)$"))
    expect(form).to_be_hidden()
    tcp = Line(gw.ports["tcp"])
    tcp.send(f"AUTH password alice {password}\n".encode())
    tcp.send(b"hello page\n")
    entry = page.locator("#log li.message").filter(has_text="hello page")
    expect(entry).to_have_count(1)
    browser_says(page, "hello tcp")
    assert tcp.line() == b"hello tcp"
    stored = page.evaluate("() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert password not in stored and password not in page.content()
    screenshot(page, "browser-signin.png")


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_page_recovers_what_it_missed_while_the_gateway_restarted(run_gateway, chromium, store):
    """The page remembers its offset and epoch per channel and resumes with them: its own
    channel in the WebSocket URL, a joined one with a subscribe. With the sqlite store the
    missed messages just appear; with the memory store the epoch changed, so the page shows
    where messages may have been missed, then the channel's last messages."""
    ports = {name: free_port() for name in ("tcp", "room", "ws")}
    toml = (
        (toml_table("history", store="sqlite:history.db") if store == "sqlite" else "")
        + toml_table("channels.main", history=100)
        + toml_table('channels."room.*"', history=100)
        + toml_listener("tcp", port=ports["tcp"])
        + toml_listener("room", "tcp", port=ports["room"], channel="room.1")
        + toml_listener("ws", port=ports["ws"], ping_interval=0)
    )
    gw = run_gateway(toml)
    context = chromium().new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.goto(f"http://127.0.0.1:{ports['ws']}/")
    me = wait_connected(page)
    page.locator("#channel").fill("room.1")
    page.locator("#channel").press("Enter")
    expect(page.locator("#channels li .name")).to_have_text(["main", "room.1"])
    tcp, room = Line(ports["tcp"]), Line(ports["room"])
    tcp.send(b"before 1\nbefore 2\n")
    room.send(b"room before\n")
    for text in ("before 1", "before 2", "room before"):
        expect(page.locator("#log li.message", has_text=text)).to_have_count(1)
    browser_says(page, "from the page")  # offset 3: the page's own, never sent back to it
    assert tcp.line() == b"from the page"
    tcp.close()
    room.close()

    # The gateway restarts; the page, offline meanwhile, misses what is sent then.
    assert gw.stop() == 0
    expect(page.locator("#status")).to_have_attribute("data-state", "closed")
    context.set_offline(True)
    gw = run_gateway(toml)
    tcp, room = Line(ports["tcp"]), Line(ports["room"])
    tcp.send(b"missed 1\nmissed 2\n")
    room.send(b"room missed\n")
    with websocket(gw, subprotocols=[JSON_SUBPROTOCOL]) as witness:  # all of it recorded
        while json.loads(witness.recv(timeout=TIMEOUT)).get("text") != "missed 2":
            pass
    context.set_offline(False)
    page.evaluate("window.dispatchEvent(new Event('online'))")  # reconnect now
    wait_connected(page)

    for text in ("missed 1", "missed 2", "room missed", "before 1", "before 2", "room before"):
        expect(page.locator("#log li.message", has_text=text)).to_have_count(1)
    # Recovered too (with sqlite), and not shown twice: the page showed it when it sent it.
    expect_message(page, "from the page", f"you ({me})", "ws")
    resumed = [url for url in sockets if "since=" in url]
    assert resumed and re.search(r"/ws\?since=2&epoch=[\w-]+$", resumed[-1]), sockets
    markers = page.locator("#log li.missed")
    if store == "sqlite":
        expect(markers).to_have_count(0)  # nothing was missed: the same epoch went on
    else:
        expect(markers).to_have_count(2)  # a new epoch: the page cannot know what it missed
        expect(markers.locator(".channel")).to_have_text(["main", "room.1"])
        expect(markers.first).to_contain_text("— some messages were missed —")
    entries = page.locator("#log li").all_inner_texts()
    first_missed = next(i for i, text in enumerate(entries) if "missed 1" in text)
    assert all("missed —" not in text for text in entries[first_missed:][:1])
    if store == "memory":
        assert any("missed —" in text for text in entries[:first_missed])
    screenshot(page, f"browser-recovery-{store}.png")
    tcp.close()
    room.close()
