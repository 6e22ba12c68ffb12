"""The sans-I/O DTLS 1.2 client (``gateway.dtls.client``), against the server engine.

Both ends run in memory: the datagrams between ``DtlsClient`` and
``DtlsServer`` are handed across by hand (so any can be dropped or forged),
time is a ``Clock``. Only the retransmission test also waits for real time:
OpenSSL measures its DTLS timers on the real clock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock

from gateway.dtls.client import (
    ClientCertificate,
    DtlsClient,
    client_context,
    client_files,
)
from gateway.dtls.cookies import Address
from gateway.dtls.records import split
from gateway.dtls.server import DEFAULT_MTU, DtlsServer, Outcome
from gateway.dtls.session import PEER_CLOSED, DtlsSession
from gateway.tls.files import Material, TlsFileError
from gateway.tls.pki import issue_certificate, make_ca

ADDRESS: Address = ("192.0.2.7", 40000)


@dataclass(frozen=True)
class Pki:
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    client_ca: x509.Certificate
    client_ca_key: ec.EllipticCurvePrivateKey

    def client_cert(self, name: str) -> ClientCertificate:
        cert, key = issue_certificate(self.client_ca, self.client_ca_key, name, client=True)
        return [cert], key


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key = make_ca("Test server CA")
    server, server_key = issue_certificate(ca, ca_key, "localhost", ("localhost", "127.0.0.1"))
    client_ca, client_ca_key = make_ca("Test client CA")
    return Pki(ca, ca_key, server, server_key, client_ca, client_ca_key)


class ServerSide:
    """A ``SessionOwner``: the engine's side of the network."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.completed: list[DtlsSession] = []
        self.ended: list[tuple[DtlsSession, str]] = []

    def transmit(self, datagram: bytes, address: Address) -> None:
        assert address == ADDRESS
        self.sent.append(datagram)

    def handshake_completed(self, session: DtlsSession) -> None:
        self.completed.append(session)

    def session_ended(self, session: DtlsSession, reason: str) -> None:
        self.ended.append((session, reason))


class ClientSide:
    """A ``ClientOwner``: the client's side of the network."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.completed = 0
        self.ended: list[str] = []

    def transmit(self, datagram: bytes) -> None:
        self.sent.append(datagram)

    def handshake_completed(self) -> None:
        self.completed += 1

    def session_ended(self, reason: str) -> None:
        self.ended.append(reason)


class Link:
    """One ``DtlsClient``, one ``DtlsServer``, and the datagrams between them."""

    def __init__(
        self,
        pki: Pki,
        hostname: str = "localhost",
        *,
        trust: list[x509.Certificate] | None = None,
        certificate: ClientCertificate | None = None,
        client_ca: bool = False,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        self.clock = Clock()
        self.server_side = ServerSide()
        material = Material([pki.server], pki.server_key, [pki.client_ca] if client_ca else None)
        self.server = DtlsServer(material, self.server_side, self.clock, mtu=mtu)
        self.client_side = ClientSide()
        context = client_context([pki.ca] if trust is None else trust, certificate)
        self.client = DtlsClient(context, hostname, self.client_side, self.clock, mtu=mtu)
        self.session: DtlsSession | None = None
        self.outcomes: list[Outcome] = []
        self.to_client: list[bytes] = []  # the server's messages

    def to_server(self, datagram: bytes) -> list[bytes]:
        if self.session is not None and not self.session.ended:
            return self.session.receive(datagram)
        admission = self.server.accept(datagram, ADDRESS)
        self.outcomes.append(admission.outcome)
        if admission.session is not None:
            self.session = admission.session
        return []

    def pump(self) -> list[bytes]:
        """Carry datagrams both ways until both sides are quiet; the messages the client got."""
        received: list[bytes] = []
        for _ in range(20):
            outbound, self.client_side.sent = self.client_side.sent, []
            for datagram in outbound:
                self.to_client += self.to_server(datagram)
            inbound, self.server_side.sent = self.server_side.sent, []
            for datagram in inbound:
                received += self.client.receive(datagram)
            if not outbound and not inbound:
                return received
        raise AssertionError("the link does not settle")

    def connect(self) -> DtlsSession:
        self.client.start()
        self.pump()
        assert self.client.handshake_done, self.client.end_reason
        assert self.session is not None and self.session.handshake_done
        return self.session


# The handshake


def test_the_handshake_passes_the_cookie_exchange_and_verifies_the_server(pki: Pki) -> None:
    link = Link(pki)
    link.client.start()
    [hello] = link.client_side.sent
    assert not link.client.handshake_done
    assert hello[13] == 1  # a ClientHello
    link.pump()
    assert link.outcomes == [Outcome.CHALLENGED, Outcome.ACCEPTED]
    assert link.client.handshake_done and link.client_side.completed == 1
    assert link.session is not None and link.server_side.completed == [link.session]
    assert link.client.server_subject == "localhost"
    assert link.client.end_reason is None and link.client_side.ended == []
    assert 0 < link.client.max_message_bytes < DEFAULT_MTU
    assert link.clock.getDelayedCalls() == []  # no retransmission timer once it is done
    with pytest.raises(RuntimeError):
        link.client.start()


def test_an_ip_address_is_checked_against_the_certificates_addresses(pki: Pki) -> None:
    link = Link(pki, "127.0.0.1")
    link.connect()
    refused = Link(pki, "127.0.0.2")
    refused.client.start()
    refused.pump()
    assert refused.client.end_reason == (
        "handshake failed: the server's certificate is not valid for '127.0.0.2' "
        "(hostname mismatch)"
    )


def test_messages_go_both_ways_one_per_record(pki: Pki) -> None:
    link = Link(pki)
    session = link.connect()
    assert link.client.send(b"hello\n")
    assert link.pump() == [] and link.to_client == [b"hello\n"]
    assert link.client.send_all([b"one\n", b"two\n", b"three\n"]) == 0
    [datagram] = link.client_side.sent  # three records, one datagram
    assert len(split(datagram) or []) == 3
    link.pump()
    assert link.to_client[1:] == [b"one\n", b"two\n", b"three\n"]

    assert session.send_all([b"welcome\n", b"news\n"]) == 0
    assert link.pump() == [b"welcome\n", b"news\n"]


def test_a_message_that_does_not_fit_one_record_is_refused(pki: Pki) -> None:
    link = Link(pki, mtu=300)
    link.connect()
    biggest = link.client.max_message_bytes
    assert 200 < biggest < 300
    assert not link.client.send(b"x" * (biggest + 1))
    assert link.client_side.sent == []
    assert not link.client.send(b"")
    assert link.client.send(b"y" * biggest)
    assert max(len(datagram) for datagram in link.client_side.sent) <= 300
    link.pump()
    assert link.to_client == [b"y" * biggest]


def test_nothing_is_sent_before_the_handshake(pki: Pki) -> None:
    link = Link(pki)
    assert not link.client.send(b"early\n")
    link.client.start()
    link.client_side.sent.clear()
    assert not link.client.send(b"early\n") and link.client_side.sent == []


# A server that is not who it should be


def test_a_server_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    other, _ = make_ca("Another CA")
    link = Link(pki, trust=[other])
    link.client.start()
    link.pump()
    reason = "handshake failed: the server's certificate is not trusted "
    assert link.client.ended and not link.client.handshake_done
    assert link.client_side.ended == [link.client.end_reason]
    assert (link.client.end_reason or "").startswith(reason), link.client.end_reason
    assert link.client_side.completed == 0
    # The client told the server with an alert: its session failed too, with no peer made.
    assert link.session is not None and link.session.ended
    assert link.server_side.completed == []
    assert link.clock.getDelayedCalls() == []


def test_a_server_certificate_for_another_name_is_refused(pki: Pki) -> None:
    link = Link(pki, "gateway.example")
    link.client.start()
    link.pump()
    assert link.client_side.ended == [
        "handshake failed: the server's certificate is not valid for 'gateway.example' "
        "(hostname mismatch)"
    ]
    assert link.client_side.completed == 0 and link.server_side.completed == []
    assert link.session is not None and link.session.ended
    [(_, reason)] = link.server_side.ended
    assert reason.startswith("handshake failed: ")
    assert not link.client.send(b"secret\n") and link.client_side.sent == []


# Mutual DTLS


def test_a_client_certificate_names_the_client_to_the_server(pki: Pki) -> None:
    link = Link(pki, certificate=pki.client_cert("alice"), client_ca=True)
    session = link.connect()
    assert session.subject == "alice"
    assert link.client.send(b"from alice\n")
    link.pump()
    assert link.to_client == [b"from alice\n"]


def test_without_a_client_certificate_a_server_that_wants_one_refuses(pki: Pki) -> None:
    link = Link(pki, client_ca=True)
    link.client.start()
    link.pump()
    assert not link.client.handshake_done and link.client.ended
    [reason] = link.client_side.ended
    assert reason.startswith("handshake failed: "), reason
    assert link.server_side.completed == []
    [(_, server_reason)] = link.server_side.ended
    assert "certificate" in server_reason


def test_client_certificate_files_need_both_halves_and_must_match(pki: Pki, tmp_path: Path) -> None:
    [cert], key = pki.client_cert("bob")
    pem = tmp_path / "bob.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private = tmp_path / "bob.key"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.public_bytes(serialization.Encoding.PEM))
    trust, pair = client_files(ca, pem, private)
    assert trust == [pki.ca] and pair is not None and pair[0] == [cert]
    assert client_files(None, None, None) == (None, None)
    with pytest.raises(TlsFileError) as missing:
        client_files(ca, pem, None)
    assert missing.value.key == "key"
    _, other_key = pki.client_cert("carol")
    other = tmp_path / "carol.key"
    other.write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TlsFileError, match="does not match"):
        client_files(ca, pem, other)
    with pytest.raises(TlsFileError) as unreadable:
        client_files(tmp_path / "none.pem", None, None)
    assert unreadable.value.key == "ca"


# Closing


def test_closing_sends_close_notify_and_the_server_session_ends(pki: Pki) -> None:
    link = Link(pki)
    session = link.connect()
    link.client.close()
    link.client.close()
    assert link.client.ended and link.client_side.ended == ["closed by the client"]
    [close_notify] = link.client_side.sent
    assert close_notify[0] == 21  # an alert record (its content encrypted)
    link.pump()
    assert session.ended and session.end_reason == PEER_CLOSED
    assert not link.client.send(b"late\n") and link.client_side.sent == []


def test_the_server_closing_ends_the_client_which_answers(pki: Pki) -> None:
    link = Link(pki)
    session = link.connect()
    session.close("gateway stopping")
    [close_notify] = link.server_side.sent
    link.server_side.sent.clear()
    assert link.client.receive(close_notify) == []
    assert link.client.ended and link.client_side.ended == [PEER_CLOSED]
    assert link.client.end_reason == PEER_CLOSED
    [answer] = link.client_side.sent  # the client's own close_notify
    assert split(answer) is not None
    assert not link.client.send(b"late\n")


def test_closing_before_the_handshake_ends_quietly(pki: Pki) -> None:
    link = Link(pki)
    link.client.start()
    link.client_side.sent.clear()
    link.client.close("giving up")
    assert link.client_side.sent == [] and link.client_side.ended == ["giving up"]
    assert link.clock.getDelayedCalls() == []


# A hostile network


def test_garbage_and_forged_records_deliver_nothing(pki: Pki) -> None:
    link = Link(pki)
    link.client.start()
    for datagram in [b"", os.urandom(80), b"\x16\xfe\xfd" + os.urandom(40)]:
        assert link.client.receive(datagram) == []
    link.pump()
    assert link.client.handshake_done and link.session is not None
    assert link.session.send(b"real\n")
    [record] = link.server_side.sent
    link.server_side.sent.clear()
    flipped = record[:-1] + bytes([record[-1] ^ 1])
    discarded = link.client.discarded
    for datagram in [b"\x17\x03\x03" + os.urandom(97), record[:-3], flipped, b""]:
        assert link.client.receive(datagram) == []
    assert link.client.discarded == discarded + 3  # never reached OpenSSL: not whole records
    assert link.client.receive(record) == [b"real\n"]
    assert link.client.receive(record) == []  # replayed
    assert not link.client.ended and link.client_side.ended == []


# Retransmission on the injected clock


def test_a_lost_client_hello_is_sent_again_when_the_clock_says_so(pki: Pki) -> None:
    link = Link(pki)
    link.client.start()
    [hello] = link.client_side.sent
    link.client_side.sent.clear()
    link.to_server(hello)
    [verify_request] = link.server_side.sent
    link.server_side.sent.clear()
    link.client.receive(verify_request)
    [lost] = link.client_side.sent  # the ClientHello with the cookie
    link.client_side.sent.clear()
    [timer] = link.clock.getDelayedCalls()
    delay = timer.getTime() - link.clock.seconds()
    assert 0.5 < delay <= 1.0  # OpenSSL's first DTLS timeout is one second

    link.clock.advance(delay)  # no real time has passed: OpenSSL's own timer is not due
    assert link.client_side.sent == [] and link.client.retransmissions == 0
    time.sleep(delay + 0.05)
    [timer] = link.clock.getDelayedCalls()
    link.clock.advance(timer.getTime() - link.clock.seconds())
    [again] = link.client_side.sent
    assert again[13:] == lost[13:]  # the same ClientHello, in a record with the next number
    assert link.client.retransmissions == 1
    link.pump()
    assert link.outcomes == [Outcome.CHALLENGED, Outcome.ACCEPTED]
    assert link.client.handshake_done and link.clock.getDelayedCalls() == []


@pytest.mark.parametrize("mtu", [100, 70000])
def test_an_mtu_openssl_cannot_use_is_refused(pki: Pki, mtu: int) -> None:
    with pytest.raises(ValueError, match="mtu"):
        DtlsClient(client_context([pki.ca]), "localhost", ClientSide(), Clock(), mtu=mtu)
