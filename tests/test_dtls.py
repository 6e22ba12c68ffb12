"""``dtls`` listeners in memory: pyOpenSSL's DTLS client against the real listener on the
memory reactor (cookie exchange, handshake, relay, sign-in, timeouts, limits)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from gateway.auth.credentials import new_token, token_digest
from gateway.testing import DatagramPort, MemoryGateway
from gateway.transports.datagram.secure import SecureDatagramServer
from tests.test_dtls_engine import Client

SOURCE = ("127.0.0.1", 40001)

CONFIG = """
[limits]
handshake_timeout = 2
auth_timeout = 2
{limits}
{auth}
[[listeners]]
name = "tcp"
type = "tcp"
port = 8006

[[listeners]]
name = "dtls"
type = "dtls"
port = 8008
cert = "{base}/server.pem"
key = "{base}/server.key"
generate_dev_cert = true
welcome = "hi {{peer}}"
{keys}
"""


class Device:
    """A DTLS client at one source address of the listener's port."""

    def __init__(self, gw: MemoryGateway, base: Path, source: tuple[str, int] = SOURCE) -> None:
        self.gw = gw
        self.port: DatagramPort = gw.datagrams("dtls")
        self.source = source
        ca = x509.load_pem_x509_certificate((base / "ca.pem").read_bytes())
        self.client = Client(ca)
        self.sent: list[bytes] = []  # every datagram the gateway sent it

    def pump(self) -> None:
        self.client.step()
        for _ in range(20):
            outbound = self.client.datagrams()
            for datagram in outbound:
                self.port.send(datagram, self.source)
            inbound = self.port.received(self.source)
            self.sent += inbound
            for datagram in inbound:
                self.client.receive(datagram)
            if not outbound and not inbound:
                return
        raise AssertionError("the exchange does not settle")

    def send(self, line: bytes) -> None:
        self.port.send(self.client.send(line), self.source)
        self.pump()

    def take(self) -> list[bytes]:
        messages, self.client.messages = self.client.messages, []
        return messages


def gateway(tmp_path: Path, keys: str = "", limits: str = "", auth: str = "") -> MemoryGateway:
    text = CONFIG.format(base=tmp_path, keys=keys, limits=limits, auth=auth)
    return MemoryGateway(text, base=tmp_path)


def server(gw: MemoryGateway) -> SecureDatagramServer:
    listener = gw.listener("dtls")
    assert isinstance(listener.server, SecureDatagramServer)  # type: ignore[attr-defined]
    return listener.server  # type: ignore[attr-defined]


def test_a_device_joins_after_the_handshake_and_relays_both_ways(tmp_path):
    gw = gateway(tmp_path)
    line = gw.connect("tcp")
    device = Device(gw, tmp_path)
    device.pump()
    assert device.client.done
    assert device.take() == [b"hi dtls-1\n"]
    device.send(b"reading 21.5\n")
    assert line.received() == b"reading 21.5\n"
    line.send(b"set 22\n")
    device.pump()
    assert device.take() == [b"set 22\n"]
    assert gw.logged("dtls-1 joined from 127.0.0.1:40001")
    assert [peer.origin.transport for peer in gw.peers()] == ["tcp", "dtls"]


def test_the_cookie_exchange_comes_first_and_keeps_nothing(tmp_path):
    gw = gateway(tmp_path)
    device = Device(gw, tmp_path)
    device.client.step()
    [hello] = device.client.datagrams()
    for port in range(1000, 1500):  # forged sources: one ClientHello each
        device.port.send(hello, ("127.0.0.9", port))
        [reply] = device.port.received(("127.0.0.9", port))
        assert len(reply) <= len(hello)
    assert server(gw).sessions == {} and server(gw).peers == {}
    assert gw.peers() == []


def test_an_unfinished_handshake_is_dropped_at_handshake_timeout(tmp_path):
    gw = gateway(tmp_path)
    device = Device(gw, tmp_path)
    device.client.step()
    device.port.send(device.client.datagrams()[0], SOURCE)  # the ClientHello
    device.client.receive(device.port.received(SOURCE)[0])  # the HelloVerifyRequest
    device.port.send(device.client.datagrams()[0], SOURCE)  # ClientHello with the cookie
    assert len(server(gw).sessions) == 1
    gw.advance(2.5)
    assert server(gw).sessions == {}
    assert gw.bus.metrics.disconnects["handshake_timeout"] == 1
    assert gw.logged("failed the DTLS handshake on listener")


def test_a_silent_peer_leaves_at_peer_timeout_with_a_close_notify(tmp_path):
    gw = gateway(tmp_path, keys="peer_timeout = 5")
    device = Device(gw, tmp_path)
    device.pump()
    gw.advance(4)
    device.send(b"\n")  # an empty line keeps it alive, relays nothing
    gw.advance(4)
    assert len(gw.peers()) == 1
    gw.advance(1.5)
    assert gw.peers() == []
    device.pump()
    assert device.client.closed  # the close_notify arrived
    assert gw.logged(r"dtls-1 left \(timed out\)")


def test_a_close_notify_from_the_device_ends_its_session(tmp_path):
    gw = gateway(tmp_path)
    device = Device(gw, tmp_path)
    device.pump()
    device.client.connection.shutdown()
    for datagram in device.client.datagrams():
        device.port.send(datagram, SOURCE)
    assert gw.peers() == [] and server(gw).sessions == {}
    assert gw.logged(r"dtls-1 left \(closed by the peer\)")


def test_max_peers_counts_sessions_and_refuses_more_sources(tmp_path):
    gw = gateway(tmp_path, keys="max_peers = 1")
    Device(gw, tmp_path).pump()
    second = Device(gw, tmp_path, ("127.0.0.1", 40002))
    second.pump()
    assert not second.client.done
    assert second.sent == []  # not even a HelloVerifyRequest
    assert gw.bus.metrics.dropped["udp_max_peers"] >= 1


def test_a_message_that_does_not_fit_one_record_is_dropped_for_the_device(tmp_path):
    gw = gateway(tmp_path, keys="mtu = 600")
    line, other = gw.connect("tcp"), gw.connect("tcp")
    device = Device(gw, tmp_path)
    device.pump()
    device.take()
    line.send(b"x" * 700 + b"\n")
    device.pump()
    assert device.take() == []
    assert gw.bus.metrics.dropped["dtls_too_large"] == 1
    assert other.received() == b"x" * 700 + b"\n"
    line.send(b"fits\n")
    device.pump()
    assert device.take() == [b"fits\n"]
    assert all(len(datagram) <= 600 for datagram in device.sent)


TOKEN = new_token()
AUTH = f"""
[roles.all]
publish = [">"]
subscribe = [">"]
[auth.tokens.sensor]
sha256 = "{token_digest(TOKEN)}"
roles = ["all"]
"""


def test_the_first_record_signs_in_and_what_follows_waits_for_it(tmp_path):
    gw = gateway(tmp_path, keys='auth = ["token"]', auth=AUTH)
    line = gw.connect("tcp")
    device = Device(gw, tmp_path)
    device.pump()
    assert gw.peers() == [gw.peers()[0]]  # only the tcp peer: not signed in yet
    device.port.send(device.client.send(f"AUTH token {TOKEN}\n".encode()), SOURCE)
    device.send(b"signed reading\n")
    assert line.received() == b"signed reading\n"
    (peer,) = [p for p in gw.peers() if p.origin.transport == "dtls"]
    assert peer.origin.user == "sensor"
    assert device.take() == [b"hi dtls-1\n"]


@pytest.mark.parametrize("first", [b"AUTH token wrong\n", b"no sign-in\n"])
def test_a_failed_sign_in_is_told_and_the_session_closed(tmp_path, first):
    gw = gateway(tmp_path, keys='auth = ["token"]', auth=AUTH)
    line = gw.connect("tcp")
    device = Device(gw, tmp_path)
    device.pump()
    device.send(first)
    assert device.take() == [b"gateway: authentication failed\n"]
    assert device.client.closed
    assert line.received() == b""
    assert gw.bus.metrics.disconnects["auth_failed"] == 1


def test_a_device_that_never_signs_in_is_closed_at_auth_timeout(tmp_path):
    gw = gateway(tmp_path, keys='auth = ["token"]', auth=AUTH)
    device = Device(gw, tmp_path)
    device.pump()
    gw.advance(2.5)
    device.pump()
    assert device.take() == [b"gateway: authentication timed out\n"]
    assert device.client.closed
    assert server(gw).sessions == {}


def test_json_devices_get_the_json_welcome(tmp_path):
    gw = gateway(tmp_path, keys='format = "json"')
    device = Device(gw, tmp_path)
    device.pump()
    [welcome] = device.take()
    assert welcome.startswith(b'{"type":"welcome","peer":"dtls-1"')
    device.send(b'{"type":"subscribe","channel":"room.1"}\n')
    assert device.take() == [b'{"type":"subscribed","channel":"room.1"}\n']


@pytest.mark.parametrize(
    ("keys", "wanted"),
    [
        ("challenge = true", "challenge: unknown key"),
        ('min_tls = "1.3"', "min_tls: unknown key"),
        ("mtu = 100", "mtu: "),
        ('host = "0.0.0.0"', "anonymous_role: missing: the listener is reachable"),
        ('auth = ["cert"]', '"cert" needs a tls, wss or dtls listener with client_ca'),
    ],
)
def test_dtls_config_errors_name_the_key(tmp_path, keys, wanted):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=wanted):
        gateway(tmp_path, keys=keys)


def test_garbage_from_strangers_and_inside_a_session_changes_nothing(tmp_path):
    gw = gateway(tmp_path)
    line = gw.connect("tcp")
    device = Device(gw, tmp_path)
    device.pump()
    port = device.port
    for junk in (
        b"",
        b"\x16\xfe\xfd",
        b"\x17\xfe\xfd" + b"\x00" * 11 + b"\x00\x05hello",
        b"x" * 900,
    ):
        port.send(junk, ("127.0.0.1", 40999))  # a stranger
        port.send(junk, SOURCE)  # inside the session
    assert port.received(("127.0.0.1", 40999)) == []
    assert len(server(gw).sessions) == 1
    assert line.received() == b""
    assert gw.bus.metrics.dropped["dtls_unverified"] >= 1
    device.send(b"still here\n")
    assert line.received() == b"still here\n"


def test_a_device_restarting_from_the_same_port_replaces_its_session(tmp_path):
    gw = gateway(tmp_path)
    line = gw.connect("tcp")
    Device(gw, tmp_path).pump()
    again = Device(gw, tmp_path)  # a new client, the same source address and port
    again.pump()
    assert again.client.done
    assert again.take() == [b"hi dtls-2\n"]
    assert [peer.origin.peer_id for peer in gw.peers()] == ["tcp-1", "dtls-2"]
    assert gw.logged(r"dtls-1 left \(the client started a new session\)")
    again.send(b"after the restart\n")
    assert line.received() == b"after the restart\n"


def test_a_source_that_keeps_failing_to_sign_in_is_locked_out(tmp_path):
    gw = gateway(tmp_path, keys='auth = ["token"]', auth=AUTH, limits="max_auth_failures = 2")
    for port in (40001, 40002, 40003):
        device = Device(gw, tmp_path, ("127.0.0.1", port))
        device.pump()
        device.send(b"AUTH token wrong\n")
    locked = Device(gw, tmp_path, ("127.0.0.1", 40004))
    locked.pump()
    assert not locked.client.done and locked.sent == []
    assert gw.bus.metrics.dropped["auth_lockout"] == 1


def test_records_behind_the_sign_in_in_the_same_datagram_are_relayed(tmp_path):
    gw = gateway(tmp_path, keys='auth = ["token"]', auth=AUTH)
    line = gw.connect("tcp")
    device = Device(gw, tmp_path)
    device.pump()
    connection = device.client.connection
    connection.send(f"AUTH token {TOKEN}\n".encode())
    connection.send(b"one\n")
    connection.send(b"two\n")
    [datagram] = device.client.datagrams()  # three records in one datagram
    device.port.send(datagram, SOURCE)
    assert line.received() == b"one\ntwo\n"
