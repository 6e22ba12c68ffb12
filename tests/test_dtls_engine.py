"""The sans-I/O DTLS 1.2 server engine (``gateway.dtls``), against pyOpenSSL's DTLS client.

Everything runs in memory: the client is a pyOpenSSL ``Connection`` on memory
BIOs, datagrams are handed across by hand (so any of them can be dropped,
replayed or forged) and time is a ``Clock``. Only the retransmission test also
waits for real time, because OpenSSL measures its DTLS timers on the real clock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.task import Clock

from gateway.dtls.context import DTLS1_2_VERSION
from gateway.dtls.cookies import COOKIE_WINDOW, Address, Cookies
from gateway.dtls.records import is_client_hello, pack, split
from gateway.dtls.server import DEFAULT_MTU, Admission, DtlsServer, Outcome
from gateway.dtls.session import PEER_CLOSED, DtlsSession, outgoing
from gateway.tls.files import Material
from gateway.tls.pki import fingerprint, issue_certificate, make_ca
from gateway.tls.server import certificate_subject

DTLS1_VERSION = 0xFEFF
ADDRESS: Address = ("192.0.2.7", 40000)

# Certificates: a server CA, a client CA and a rogue one, made once for the module.


@dataclass(frozen=True)
class Pki:
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    client_ca: x509.Certificate
    client_ca_key: ec.EllipticCurvePrivateKey

    def material(self, client_ca: bool = False) -> Material:
        return Material([self.server], self.server_key, [self.client_ca] if client_ca else None)

    def client_cert(
        self, name: str, rogue: bool = False
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if rogue:
            ca, ca_key = make_ca("Rogue CA")
            return issue_certificate(ca, ca_key, name, client=True)
        return issue_certificate(self.client_ca, self.client_ca_key, name, client=True)


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key = make_ca("Test server CA")
    server, server_key = issue_certificate(ca, ca_key, "localhost", ("localhost", "127.0.0.1"))
    client_ca, client_ca_key = make_ca("Test client CA")
    return Pki(ca, ca_key, server, server_key, client_ca, client_ca_key)


# The network between one client and the engine.


class Owner:
    """A ``SessionOwner`` that keeps what it is told."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.completed: list[DtlsSession] = []
        self.ended: list[tuple[DtlsSession, str]] = []

    def transmit(self, datagram: bytes, address: Address) -> None:
        self.sent.append((datagram, address))

    def handshake_completed(self, session: DtlsSession) -> None:
        self.completed.append(session)

    def session_ended(self, session: DtlsSession, reason: str) -> None:
        self.ended.append((session, reason))

    def take(self, address: Address = ADDRESS) -> list[bytes]:
        """The datagrams sent to ``address`` since the last take."""
        mine = [datagram for datagram, to in self.sent if to == address]
        self.sent = [(datagram, to) for datagram, to in self.sent if to != address]
        return mine


class Client:
    """pyOpenSSL's DTLS client on memory BIOs, verifying the server against ``ca``."""

    def __init__(
        self,
        ca: x509.Certificate,
        cert: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
        version: int = DTLS1_2_VERSION,
        mtu: int = DEFAULT_MTU,
        ciphers: bytes | None = None,
    ) -> None:
        context = SSL.Context(SSL.DTLS_CLIENT_METHOD)
        context.set_options(SSL.OP_NO_QUERY_MTU)
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
        if version == DTLS1_VERSION:
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        if ciphers is not None:
            context.set_cipher_list(ciphers)
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(X509.from_cryptography(ca))
        context.set_verify(SSL.VERIFY_PEER)
        if cert is not None:
            context.use_certificate(cert[0])
            context.use_privatekey(cert[1])
        self.mtu = mtu
        self.connection = SSL.Connection(context, None)
        self.connection.set_connect_state()
        self.connection.set_ciphertext_mtu(mtu)
        self.done = False
        self.error: str | None = None
        self.closed = False
        self.messages: list[bytes] = []

    def step(self) -> None:
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as e:
            self.error = str(e)
            return
        self.done = True

    def datagrams(self) -> list[bytes]:
        return outgoing(self.connection, self.mtu)

    def receive(self, datagram: bytes) -> None:
        self.connection.bio_write(datagram)
        if not self.done and self.error is None:
            self.step()
        while self.done and not self.closed:
            try:
                self.messages.append(self.connection.recv(16384))
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.closed = True
            except SSL.Error as e:
                self.error = str(e)
                return

    def send(self, message: bytes) -> bytes:
        self.connection.send(message)
        [datagram] = self.datagrams()
        return datagram


class Link:
    """One client, one engine, and the datagrams between them (each can be dropped)."""

    def __init__(self, server: DtlsServer, owner: Owner, client: Client) -> None:
        self.server = server
        self.owner = owner
        self.client = client
        self.session: DtlsSession | None = None
        self.admissions: list[Admission] = []
        self.received: list[bytes] = []

    def to_server(self, datagram: bytes) -> None:
        if self.session is not None and not self.session.ended:
            self.received += self.session.receive(datagram)
            return
        admission = self.server.accept(datagram, ADDRESS)
        self.admissions.append(admission)
        if admission.session is not None:
            self.session = admission.session

    def pump(self) -> None:
        """Carry datagrams both ways until neither side has anything more to say."""
        self.client.step()
        for _ in range(20):
            outbound = self.client.datagrams()
            for datagram in outbound:
                self.to_server(datagram)
            inbound = self.owner.take()
            for datagram in inbound:
                self.client.receive(datagram)
            if not outbound and not inbound:
                return
        raise AssertionError("the handshake does not settle")

    @property
    def outcomes(self) -> list[Outcome]:
        return [admission.outcome for admission in self.admissions]


def engine(pki: Pki, client_ca: bool = False, mtu: int = DEFAULT_MTU) -> tuple[DtlsServer, Owner]:
    owner = Owner()
    return DtlsServer(pki.material(client_ca), owner, Clock(), mtu=mtu), owner


def clock_of(server: DtlsServer) -> Clock:
    assert isinstance(server.clock, Clock)
    return server.clock


def connected(pki: Pki, mtu: int = DEFAULT_MTU) -> Link:
    server, owner = engine(pki, mtu=mtu)
    link = Link(server, owner, Client(pki.ca, mtu=mtu))
    link.pump()
    assert link.client.done and link.session is not None and link.session.handshake_done
    return link


def hello(client: Client) -> bytes:
    client.step()
    [datagram] = client.datagrams()
    return datagram


# The handshake


def test_full_handshake_starts_with_the_cookie_exchange(pki: Pki) -> None:
    server, owner = engine(pki)
    client = Client(pki.ca)
    first = hello(client)
    assert server.accept(first, ADDRESS) == Admission(Outcome.CHALLENGED)
    [verify_request] = owner.take()
    assert len(verify_request) <= len(first)
    assert clock_of(server).getDelayedCalls() == []  # nothing kept for the source

    client.receive(verify_request)
    [second] = client.datagrams()
    admission = server.accept(second, ADDRESS)
    assert admission.outcome is Outcome.ACCEPTED
    session = admission.session
    assert session is not None and not session.handshake_done
    flight = owner.take()
    assert flight, "the session answers the verified ClientHello itself"
    for datagram in flight:
        client.receive(datagram)

    link = Link(server, owner, client)
    link.session = session
    link.pump()
    assert client.done and client.error is None
    assert session.handshake_done and owner.completed == [session]
    assert client.connection.get_protocol_version_name() == "DTLSv1.2"
    assert client.connection.get_cipher_name() in {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    }
    assert session.subject is None
    assert 0 < session.max_message_bytes < DEFAULT_MTU
    assert clock_of(server).getDelayedCalls() == []  # no timer once the handshake is done


def test_application_data_both_ways(pki: Pki) -> None:
    link = connected(pki)
    session = link.session
    assert session is not None
    assert session.receive(link.client.send(b"hello\n")) == [b"hello\n"]
    both = link.client.send(b"one\n") + link.client.send(b"two\n")
    assert session.receive(both) == [b"one\n", b"two\n"]  # one message per record

    assert session.send(b"welcome\n")
    [datagram] = link.owner.take()
    link.client.receive(datagram)
    assert link.client.messages == [b"welcome\n"]

    assert session.send_all([b"a\n", b"b\n", b"c\n"]) == 0
    [datagram] = link.owner.take()  # three records in one datagram
    assert len(split(datagram) or []) == 3
    link.client.receive(datagram)
    assert link.client.messages[1:] == [b"a\n", b"b\n", b"c\n"]


def test_a_client_certificate_is_required_and_names_the_peer(pki: Pki) -> None:
    server, owner = engine(pki, client_ca=True)
    link = Link(server, owner, Client(pki.ca, cert=pki.client_cert("alice")))
    link.pump()
    assert link.client.done and link.session is not None
    assert link.session.handshake_done and link.session.subject == "alice"


def test_the_subject_is_the_common_name_else_the_first_alternative_name(pki: Pki) -> None:
    named, _ = issue_certificate(pki.client_ca, pki.client_ca_key, "bob", ("bob.example",))
    unnamed, _ = issue_certificate(pki.client_ca, pki.client_ca_key, None, ("dev-7.example",))
    assert certificate_subject(named) == "bob"
    assert certificate_subject(unnamed) == "dev-7.example"


@pytest.mark.parametrize("rogue", [False, True], ids=["no certificate", "another CA"])
def test_a_client_without_a_certificate_of_the_client_ca_is_refused(pki: Pki, rogue: bool) -> None:
    server, owner = engine(pki, client_ca=True)
    cert = pki.client_cert("mallory", rogue=True) if rogue else None
    link = Link(server, owner, Client(pki.ca, cert=cert))
    link.pump()
    session = link.session
    assert session is not None and session.ended and not session.handshake_done
    assert owner.completed == []
    [(ended, reason)] = owner.ended
    assert ended is session and reason.startswith("handshake failed: ")
    assert ("certificate" in reason) and link.client.error is not None
    assert clock_of(server).getDelayedCalls() == []
    assert session.receive(b"anything") == [] and not session.send(b"x\n")


def test_a_dtls_1_0_client_is_refused(pki: Pki) -> None:
    server, owner = engine(pki)
    link = Link(server, owner, Client(pki.ca, version=DTLS1_VERSION))
    link.pump()
    assert link.session is None and not link.client.done
    assert link.outcomes == [Outcome.CHALLENGED, Outcome.REFUSED]
    reason = link.admissions[-1].reason
    assert reason == "handshake failed: unsupported protocol"
    assert owner.ended == [] and clock_of(server).getDelayedCalls() == []


def test_a_client_offering_only_cbc_suites_is_refused(pki: Pki) -> None:
    server, owner = engine(pki)
    client = Client(pki.ca, ciphers=b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA")
    link = Link(server, owner, client)
    link.pump()
    assert not client.done and link.outcomes[-1] is Outcome.REFUSED
    assert link.admissions[-1].reason == "handshake failed: no shared cipher"


# Before the cookie: no state, no amplification


def test_a_flood_of_hellos_from_forged_sources_makes_no_session(pki: Pki) -> None:
    server, owner = engine(pki)
    requests = [hello(Client(pki.ca)) for _ in range(20)]
    for n in range(2000):
        address = (f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 1024 + n)
        request = requests[n % len(requests)]
        assert server.accept(request, address).outcome is Outcome.CHALLENGED
        [reply] = owner.take(address)
        assert len(reply) <= len(request)
    assert owner.sent == [] and owner.completed == [] and owner.ended == []
    assert clock_of(server).getDelayedCalls() == []


def test_a_cookie_is_bound_to_its_source(pki: Pki) -> None:
    server, owner = engine(pki)
    client = Client(pki.ca)
    server.accept(hello(client), ADDRESS)
    client.receive(owner.take()[0])
    [with_cookie] = client.datagrams()
    elsewhere = ("192.0.2.8", 40000)
    assert server.accept(with_cookie, elsewhere).outcome is Outcome.BAD_COOKIE
    [reply] = owner.take(elsewhere)
    assert len(reply) <= len(with_cookie)
    assert server.accept(with_cookie, (ADDRESS[0], ADDRESS[1] + 1)).outcome is Outcome.BAD_COOKIE
    assert server.accept(with_cookie, ADDRESS).outcome is Outcome.ACCEPTED


@pytest.mark.parametrize(("wait", "outcome"), [(1, Outcome.ACCEPTED), (2, Outcome.BAD_COOKIE)])
def test_a_cookie_lasts_its_window_and_the_next(pki: Pki, wait: int, outcome: Outcome) -> None:
    server, owner = engine(pki)
    client = Client(pki.ca)
    server.accept(hello(client), ADDRESS)
    client.receive(owner.take()[0])
    [with_cookie] = client.datagrams()
    clock_of(server).advance(wait * COOKIE_WINDOW)
    assert server.accept(with_cookie, ADDRESS).outcome is outcome


def test_anything_but_a_client_hello_from_a_stranger_is_ignored(pki: Pki) -> None:
    server, owner = engine(pki)
    request = hello(Client(pki.ca))
    for datagram in [
        b"",
        b"hello\n",
        os.urandom(200),
        request[:40],  # truncated
        request[:13] + os.urandom(len(request) - 13),  # a ClientHello header, garbage after
        connected(pki).client.send(b"hi\n"),  # a record of another session
    ]:
        assert server.accept(datagram, ADDRESS).outcome is Outcome.IGNORED
    assert owner.sent == []


def test_cookies_are_keyed_by_the_secret() -> None:
    clock = Clock()
    cookie = Cookies(clock, b"k" * 32).make(ADDRESS)
    assert Cookies(clock, b"k" * 32).valid(ADDRESS, cookie)
    assert not Cookies(clock, b"j" * 32).valid(ADDRESS, cookie)
    assert not Cookies(clock).valid(ADDRESS, cookie)
    assert Cookies(clock, b"k" * 32).valid(("::ffff:192.0.2.7", 40000), cookie)  # mapped IPv4


# Inside a session: nothing broken, replayed or forged gets through


def test_garbage_truncated_and_replayed_records_deliver_nothing(pki: Pki) -> None:
    link = connected(pki)
    session = link.session
    assert session is not None
    record = link.client.send(b"once\n")
    assert session.receive(record) == [b"once\n"]
    flipped = record[:-1] + bytes([record[-1] ^ 1])
    for datagram in [
        record,  # replayed
        record[:-3],  # truncated
        flipped,  # forged
        os.urandom(100),
        b"",
        bytes([21, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 9, 0, 2, 2, 40]),  # plaintext fatal alert
        bytes([23, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 9, 0, 3]) + b"hi\n",  # plaintext data
        bytes([23, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0, 9, 0, 0, 30]) + os.urandom(30),
    ]:
        assert session.receive(datagram) == []
    assert not session.ended and link.owner.ended == []
    assert session.discarded == 3  # the truncated, random and empty ones never reached OpenSSL
    assert session.receive(link.client.send(b"still here\n")) == [b"still here\n"]


def test_garbage_during_the_handshake_does_not_break_it(pki: Pki) -> None:
    server, owner = engine(pki)
    link = Link(server, owner, Client(pki.ca))
    link.client.step()
    link.to_server(link.client.datagrams()[0])
    link.client.receive(owner.take()[0])
    link.to_server(link.client.datagrams()[0])
    session = link.session
    assert session is not None
    for datagram in [os.urandom(64), b"\x16\xfe\xfd" + os.urandom(40), b""]:
        assert session.receive(datagram) == []
    link.pump()
    assert link.client.done and session.handshake_done


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=80))
def test_no_datagram_raises_or_ends_an_established_session(pki: Pki, data: bytes, cut: int) -> None:
    link = connected(pki)
    session = link.session
    assert session is not None
    record = link.client.send(b"real\n")
    delivered: list[bytes] = []
    for datagram in (data, record[:cut] + data, data + record, record):
        delivered += session.receive(datagram)
    assert not session.ended
    assert delivered == [b"real\n"]  # once, whatever came around it


# Retransmission on the injected clock


def verified(pki: Pki) -> tuple[Owner, Clock, Link]:
    """A link whose client has passed the cookie exchange; the server's answer is in ``owner``."""
    server, owner = engine(pki)
    link = Link(server, owner, Client(pki.ca))
    link.client.step()
    link.to_server(link.client.datagrams()[0])
    link.client.receive(owner.take()[0])
    link.to_server(link.client.datagrams()[0])
    return owner, clock_of(server), link


def test_a_lost_flight_is_sent_again_when_the_clock_says_so(pki: Pki) -> None:
    owner, clock, link = verified(pki)
    session = link.session
    assert session is not None
    lost = owner.take()  # the server's flight: ServerHello .. ServerHelloDone
    assert lost
    [timer] = clock.getDelayedCalls()
    delay = timer.getTime() - clock.seconds()
    assert 0.5 < delay <= 1.0  # OpenSSL's first DTLS timeout is one second

    # OpenSSL's own timer runs on the real clock: let it fall due. The session
    # still sends nothing until the injected clock says so.
    time.sleep(delay + 0.05)
    assert owner.take() == []
    clock.advance(delay)
    again = owner.take()
    assert [len(datagram) for datagram in again] == [len(datagram) for datagram in lost]
    assert session.retransmissions == 1
    [timer] = clock.getDelayedCalls()  # doubled: the next try is two seconds on
    assert timer.getTime() - clock.seconds() > 1.0

    for datagram in again:
        link.client.receive(datagram)
    link.pump()
    assert link.client.done and session.handshake_done
    assert clock.getDelayedCalls() == []


def test_the_injected_clock_running_ahead_of_openssl_resends_nothing_yet(pki: Pki) -> None:
    owner, clock, link = verified(pki)
    owner.take()
    clock.advance(1.0)  # no real time has passed: OpenSSL's timer is not due
    assert owner.take() == []
    assert link.session is not None and link.session.retransmissions == 0
    [timer] = clock.getDelayedCalls()  # waiting again, for what OpenSSL says is left
    assert 0 < timer.getTime() - clock.seconds() <= 1.0


# Closing


def test_the_client_closing_ends_the_session(pki: Pki) -> None:
    link = connected(pki)
    session = link.session
    assert session is not None
    link.client.connection.shutdown()
    [close_notify] = link.client.datagrams()
    assert session.receive(close_notify) == []
    assert session.ended and session.end_reason == PEER_CLOSED
    assert link.owner.ended == [(session, PEER_CLOSED)]
    [answer] = link.owner.take()
    link.client.receive(answer)
    assert link.client.closed  # the server answered with its own close_notify
    assert not session.send(b"late\n") and link.owner.take() == []


def test_closing_sends_close_notify_once(pki: Pki) -> None:
    link = connected(pki)
    session = link.session
    assert session is not None
    session.close("shutting down")
    session.close("again")
    [close_notify] = link.owner.take()
    link.client.receive(close_notify)
    assert link.client.closed
    assert link.owner.ended == [(session, "shutting down")]
    assert session.receive(link.client.send(b"late\n")) == []
    assert not session.send(b"late\n") and link.owner.take() == []


def test_closing_during_the_handshake_sends_nothing(pki: Pki) -> None:
    server, owner = engine(pki)
    link = Link(server, owner, Client(pki.ca))
    link.client.step()
    link.to_server(link.client.datagrams()[0])
    link.client.receive(owner.take()[0])
    link.to_server(link.client.datagrams()[0])
    owner.take()
    assert link.session is not None
    link.session.close("handshake timeout")
    assert owner.take() == [] and owner.ended == [(link.session, "handshake timeout")]
    assert clock_of(server).getDelayedCalls() == []


# The MTU


def test_every_datagram_fits_a_small_mtu_and_bigger_messages_are_refused(pki: Pki) -> None:
    server, owner = engine(pki, mtu=300)
    sent: list[bytes] = []
    transmit = owner.transmit

    def watch(datagram: bytes, address: Address) -> None:
        sent.append(datagram)
        transmit(datagram, address)

    owner.transmit = watch  # type: ignore[method-assign]
    link = Link(server, owner, Client(pki.ca, mtu=300))
    link.pump()
    session = link.session
    assert session is not None and session.handshake_done
    biggest = session.max_message_bytes
    assert 200 < biggest < 300
    assert not session.send(b"x" * (biggest + 1))
    assert owner.take() == []
    assert session.send_all([b"y" * (biggest + 1), b"z" * biggest]) == 1
    assert session.send(b"x" * biggest)
    assert len(sent) > 5 and max(len(datagram) for datagram in sent) <= 300
    for datagram in owner.take():
        link.client.receive(datagram)
    assert link.client.messages == [b"z" * biggest, b"x" * biggest]


@pytest.mark.parametrize("mtu", [100, 70000])
def test_an_mtu_openssl_cannot_use_is_refused(pki: Pki, mtu: int) -> None:
    with pytest.raises(ValueError, match="mtu"):
        DtlsServer(pki.material(), Owner(), Clock(), mtu=mtu)


# A client that restarts, and a reload


def test_a_restarted_client_is_accepted_again_through_the_cookie(pki: Pki) -> None:
    link = connected(pki)
    old = link.session
    assert old is not None
    fresh = Link(link.server, link.owner, Client(pki.ca))
    fresh.client.step()
    [again] = fresh.client.datagrams()
    assert is_client_hello(again) and not is_client_hello(link.client.send(b"x\n"))
    assert old.receive(again) == []  # OpenSSL ignores it inside the old session
    fresh.to_server(again)
    fresh.pump()
    assert fresh.outcomes == [Outcome.CHALLENGED, Outcome.ACCEPTED]
    assert fresh.session is not None and fresh.session.handshake_done


def test_a_reload_serves_new_certificates_to_new_sessions(pki: Pki) -> None:
    server, owner = engine(pki)
    first = Link(server, owner, Client(pki.ca))
    first.pump()
    cert, key = issue_certificate(pki.ca, pki.ca_key, "localhost", ("localhost",))
    server.reload(Material([cert], key, None))
    assert server.fingerprint == fingerprint(cert)
    second = Link(server, owner, Client(pki.ca))
    second.pump()
    served = second.client.connection.get_peer_certificate(as_cryptography=True)
    assert served is not None and fingerprint(served) == fingerprint(cert)
    assert first.session is not None
    assert first.session.receive(first.client.send(b"old\n")) == [b"old\n"]


# Record framing


def test_records_are_packed_whole_into_datagrams_under_the_mtu() -> None:
    def record(size: int) -> bytes:
        return bytes([23, 0xFE, 0xFD]) + bytes(8) + size.to_bytes(2, "big") + bytes(size)

    records = [record(100), record(150), record(10), record(300)]
    joined = b"".join(records)
    assert split(joined) == records
    assert split(joined[:-1]) is None and split(b"\x17\x03\x03" + joined[3:]) is None
    datagrams = pack(records, 300)
    assert [len(d) for d in datagrams] == [113 + 163 + 23, 313]
    assert b"".join(datagrams) == joined
