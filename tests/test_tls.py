"""Server and client TLS, over real OpenSSL handshakes in memory (no sockets)."""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gateway.config import TlsSettings
from gateway.tls.client import client_options
from gateway.tls.files import TlsFileError, check_tls_files
from gateway.tls.pki import fingerprint, issue_certificate, make_ca, pem, pem_key
from gateway.tls.server import ServerTls, peer_subject

# Fixtures: a CA for servers, another for clients, and a rogue one.


@dataclass
class Pki:
    directory: Path
    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_ca: x509.Certificate
    client_ca_key: ec.EllipticCurvePrivateKey
    client_ca_file: Path

    def settings(self, **changes: object) -> TlsSettings:
        values: dict[str, object] = {"cert": self.server_cert, "key": self.server_key}
        values.update(changes)
        return TlsSettings(**values)  # type: ignore[arg-type]

    def client(
        self,
        name: str,
        ca: x509.Certificate | None = None,
        ca_key: ec.EllipticCurvePrivateKey | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[Path, Path]:
        """A client certificate (by the client CA unless given) written to files."""
        cert, key = issue_certificate(
            ca or self.client_ca,
            ca_key or self.client_ca_key,
            name,
            client=True,
            not_before=not_before,
            not_after=not_after,
        )
        return (
            write(self.directory / f"{name}.pem", pem(cert)),
            write(self.directory / f"{name}.key", pem_key(key)),
        )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def server_pair(
    directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, stem: str
) -> None:
    cert, key = issue_certificate(ca, ca_key, "localhost", ("localhost", "127.0.0.1"))
    write(directory / f"{stem}.pem", pem(cert))
    write(directory / f"{stem}.key", pem_key(key))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, ca_key = make_ca("Test server CA")
    server_pair(tmp_path, ca, ca_key, "server")
    client_ca, client_ca_key = make_ca("Test client CA")
    return Pki(
        directory=tmp_path,
        ca=ca,
        ca_key=ca_key,
        ca_file=write(tmp_path / "ca.pem", pem(ca)),
        server_cert=tmp_path / "server.pem",
        server_key=tmp_path / "server.key",
        client_ca=client_ca,
        client_ca_key=client_ca_key,
        client_ca_file=write(tmp_path / "client-ca.pem", pem(client_ca)),
    )


# An in-memory connection: client TLS <-> server TLS, each wrapping a Recorder.


@implementer(IHandshakeListener)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.handshakes = 0
        self.subject_at_handshake: str | None = None
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshakes += 1
        self.subject_at_handshake = peer_subject(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


class OneProtocol(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self.protocol_instance


@dataclass
class Connection:
    server: Recorder
    client: Recorder
    server_tls: TLSMemoryBIOProtocol
    client_tls: TLSMemoryBIOProtocol
    pump: IOPump

    def client_says(self, data: bytes) -> None:
        self.client_tls.write(data)
        self.pump.flush()

    @property
    def refused(self) -> bool:
        """The server ended the connection before the TLS handshake completed."""
        return (
            self.server.handshakes == 0
            and self.server.lost is not None
            and self.server.lost.check(SSL.Error) is not None
        )

    def server_error(self) -> str:
        assert self.server.lost is not None
        return str(self.server.lost.value)


def connect(
    server: IOpenSSLServerConnectionCreator, client: IOpenSSLClientConnectionCreator
) -> Connection:
    clock = Clock()
    server_inner, client_inner = Recorder(), Recorder()
    server_factory = TLSMemoryBIOFactory(server, False, OneProtocol(server_inner), clock)
    client_factory = TLSMemoryBIOFactory(client, True, OneProtocol(client_inner), clock)
    client_tls, server_tls, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return Connection(server_inner, client_inner, server_tls, client_tls, pump)


@implementer(IOpenSSLClientConnectionCreator)
class RawClient:
    """A client with chosen TLS versions and no verification (an old or odd client)."""

    def __init__(self, min_version: int, max_version: int) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(min_version)
        self.context.set_max_proto_version(max_version)
        # Security level 0 lets this client really offer TLS 1.0/1.1, so the
        # refusal seen comes from the server.
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def served_fingerprint(connection: Connection) -> str:
    certificate = connection.client_tls.getPeerCertificate()
    return fingerprint(certificate.to_cryptography())


# Plain server TLS


def test_server_tls_provides_the_interface(pki: Pki) -> None:
    assert verifyObject(IOpenSSLServerConnectionCreator, ServerTls(pki.settings()))


def test_handshake_and_data_flow(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings()), client_options("localhost", pki.ca_file, None, None)
    )
    connection.client_says(b"hello\n")
    assert connection.server.received == b"hello\n"
    connection.server_tls.write(b"welcome\n")
    connection.pump.flush()
    assert connection.client.received == b"welcome\n"
    # No client certificate was asked for.
    assert connection.server.subject_at_handshake is None


def test_handshake_completed_is_called_once_after_the_handshake(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings(client_ca=pki.client_ca_file)),
        client_options("localhost", pki.ca_file, *pki.client("alice")),
    )
    assert connection.server.handshakes == 1
    assert connection.server.subject_at_handshake == "alice"


def test_client_verifies_an_ip_address(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings()), client_options("127.0.0.1", pki.ca_file, None, None)
    )
    connection.client_says(b"x")
    assert connection.server.received == b"x"


def test_client_refuses_a_certificate_for_another_host(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings()), client_options("other.example", pki.ca_file, None, None)
    )
    connection.client_says(b"secret")
    assert connection.server.received == b""
    assert connection.client.lost is not None


def test_client_with_platform_trust_refuses_the_dev_ca(pki: Pki) -> None:
    connection = connect(ServerTls(pki.settings()), client_options("localhost", None, None, None))
    connection.client_says(b"secret")
    assert connection.server.received == b""
    assert connection.client.lost is not None


def test_client_offering_alpn_http11_gets_it(pki: Pki) -> None:
    client = optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(pki.ca_file.read_bytes()),
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    connection = connect(ServerTls(pki.settings()), client)
    connection.client_says(b"GET / HTTP/1.1\r\n")
    assert connection.server.received == b"GET / HTTP/1.1\r\n"
    assert connection.server_tls.negotiatedProtocol == b"http/1.1"


def test_client_offering_only_other_alpn_protocols_still_connects(pki: Pki) -> None:
    # Twisted's own ALPN callback fails this handshake with an internal-error alert.
    client = optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(pki.ca_file.read_bytes()),
        acceptableProtocols=[b"foo"],
    )
    connection = connect(ServerTls(pki.settings()), client)
    connection.client_says(b"hi")
    assert connection.server.received == b"hi"
    assert connection.server_tls.negotiatedProtocol is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_twisted_alone_fails_clients_without_http11_alpn(pki: Pki) -> None:
    """Why ServerTls has its own ALPN callback; if this fails, Twisted fixed it."""
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    plain = CertificateOptions(
        privateKey=PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=X509.from_cryptography(
            x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
        ),
        acceptableProtocols=[b"http/1.1"],
    )
    client = optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(pki.ca_file.read_bytes()),
        acceptableProtocols=[b"foo"],
    )
    connection = connect(plain, client)
    assert connection.refused
    assert "internal error" in connection.server_error()


def test_client_limited_to_tls11_is_refused(pki: Pki) -> None:
    connection = connect(ServerTls(pki.settings()), RawClient(SSL.TLS1_VERSION, SSL.TLS1_1_VERSION))
    assert connection.refused
    assert "unsupported protocol" in connection.server_error()


def test_min_tls_13_refuses_tls12(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings(min_tls="1.3")), RawClient(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
    )
    assert connection.refused


def test_tls12_client_is_accepted_by_default(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings()), RawClient(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
    )
    connection.client_says(b"ok")
    assert connection.server.received == b"ok"
    assert connection.server_tls.getHandle().get_protocol_version_name() == "TLSv1.2"


def _memory_handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        move_records(client, server)


def move_records(client: SSL.Connection, server: SSL.Connection) -> None:
    for connection in (client, server):
        with contextlib.suppress(SSL.WantReadError):
            connection.do_handshake()
    for source, target in ((client, server), (server, client)):
        with contextlib.suppress(SSL.WantReadError):
            target.bio_write(source.bio_read(65536))


def test_renegotiation_is_refused(pki: Pki) -> None:
    server = ServerTls(pki.settings()).serverConnectionForTLS(None)  # type: ignore[arg-type]
    assert server.set_options(0) & SSL.OP_NO_RENEGOTIATION
    client = RawClient(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION).clientConnectionForTLS(None)  # type: ignore[arg-type]
    _memory_handshake(server, client)
    assert client.get_protocol_version_name() == "TLSv1.2"
    client.renegotiate()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()
    target_bytes = client.bio_read(65536)
    server.bio_write(target_bytes)
    with pytest.raises(SSL.WantReadError):
        server.recv(100)
    client.bio_write(server.bio_read(65536))
    with pytest.raises(SSL.Error, match="no renegotiation"):
        client.do_handshake()


# Mutual TLS


def test_mtls_accepts_a_good_client_and_shows_its_subject(pki: Pki) -> None:
    connection = connect(
        ServerTls(pki.settings(client_ca=pki.client_ca_file)),
        client_options("localhost", pki.ca_file, *pki.client("alice")),
    )
    connection.client_says(b"hi")
    assert connection.server.received == b"hi"
    assert peer_subject(connection.server.transport) == "alice"
    assert peer_subject(connection.server_tls) == "alice"


def test_mtls_subject_falls_back_to_the_first_san(pki: Pki) -> None:
    cert, key = issue_certificate(
        pki.client_ca,
        pki.client_ca_key,
        None,
        ("bob.example", "10.0.0.1"),
        client=True,
    )
    cert_file = write(pki.directory / "bob.pem", pem(cert))
    key_file = write(pki.directory / "bob.key", pem_key(key))
    connection = connect(
        ServerTls(pki.settings(client_ca=pki.client_ca_file)),
        client_options("localhost", pki.ca_file, cert_file, key_file),
    )
    assert connection.server.subject_at_handshake == "bob.example"


def test_mtls_refuses_a_client_without_certificate(pki: Pki) -> None:
    # trustRoot alone (no requireCertificate) must make the certificate mandatory.
    connection = connect(
        ServerTls(pki.settings(client_ca=pki.client_ca_file)),
        client_options("localhost", pki.ca_file, None, None),
    )
    connection.client_says(b"let me in")
    assert connection.refused
    assert connection.server.received == b""
    assert "certificate" in connection.server_error()


def test_mtls_refuses_a_certificate_from_a_rogue_ca(pki: Pki) -> None:
    rogue, rogue_key = make_ca("Test client CA")  # same name, different key
    connection = connect(
        ServerTls(pki.settings(client_ca=pki.client_ca_file)),
        client_options("localhost", pki.ca_file, *pki.client("mallory", rogue, rogue_key)),
    )
    connection.client_says(b"let me in")
    assert connection.refused
    assert connection.server.received == b""


def test_mtls_refuses_an_expired_certificate(pki: Pki) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = pki.client(
        "old",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    connection = connect(
        ServerTls(pki.settings(client_ca=pki.client_ca_file)),
        client_options("localhost", pki.ca_file, *expired),
    )
    connection.client_says(b"let me in")
    assert connection.refused
    assert "certificate verify failed" in connection.server_error()


def test_peer_subject_of_a_plain_transport_is_none() -> None:
    assert peer_subject(StringTransport()) is None
    assert peer_subject(None) is None


# Reload


def test_reload_serves_the_new_certificate_to_new_connections_only(pki: Pki) -> None:
    server_tls = ServerTls(pki.settings())
    client = client_options("localhost", pki.ca_file, None, None)
    first = connect(server_tls, client)
    old_fingerprint = served_fingerprint(first)
    assert old_fingerprint == server_tls.fingerprint

    server_pair(pki.directory, pki.ca, pki.ca_key, "server")
    server_tls.reload()
    assert server_tls.fingerprint != old_fingerprint

    second = connect(server_tls, client)
    assert served_fingerprint(second) == server_tls.fingerprint
    # The open connection keeps working on its old certificate.
    first.client_says(b"still here")
    assert first.server.received == b"still here"
    assert served_fingerprint(first) == old_fingerprint


def test_reload_with_a_bad_file_keeps_the_old_certificate(pki: Pki) -> None:
    server_tls = ServerTls(pki.settings())
    client = client_options("localhost", pki.ca_file, None, None)
    before = server_tls.fingerprint
    pki.server_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    with pytest.raises(TlsFileError) as error:
        server_tls.reload()
    assert error.value.key == "cert"
    assert server_tls.fingerprint == before
    connection = connect(server_tls, client)
    connection.client_says(b"ok")
    assert connection.server.received == b"ok"
    assert served_fingerprint(connection) == before


def test_reload_with_a_mismatched_key_keeps_the_old_certificate(pki: Pki) -> None:
    server_tls = ServerTls(pki.settings())
    before = server_tls.fingerprint
    # A new certificate whose key was not installed.
    cert, _ = issue_certificate(pki.ca, pki.ca_key, "localhost", ("localhost",))
    pki.server_cert.write_bytes(pem(cert))
    with pytest.raises(TlsFileError) as error:
        server_tls.reload()
    assert error.value.key == "key"
    assert server_tls.fingerprint == before


# check_tls_files


def test_check_tls_files_accepts_good_files(pki: Pki) -> None:
    check_tls_files(pki.settings(client_ca=pki.client_ca_file))


@pytest.mark.parametrize("key", ["cert", "key", "client_ca"])
def test_check_tls_files_names_a_missing_file(pki: Pki, key: str) -> None:
    missing = pki.directory / "missing.pem"
    with pytest.raises(TlsFileError) as error:
        check_tls_files(pki.settings(**{"client_ca": pki.client_ca_file, key: missing}))
    assert error.value.key == key
    assert error.value.problem == f"cannot read {missing}: No such file or directory"
    assert str(error.value) == error.value.problem


def test_check_tls_files_names_a_key_that_does_not_match(pki: Pki) -> None:
    other_key = pki.client("carol")[1]
    with pytest.raises(TlsFileError) as error:
        check_tls_files(pki.settings(key=other_key))
    assert error.value.key == "key"
    assert error.value.problem == f"{other_key} does not match the certificate in {pki.server_cert}"


@pytest.mark.parametrize("key", ["cert", "key", "client_ca"])
def test_check_tls_files_names_garbage(pki: Pki, key: str) -> None:
    garbage = write(pki.directory / "garbage.pem", b"this is not PEM\n")
    with pytest.raises(TlsFileError) as error:
        check_tls_files(pki.settings(**{"client_ca": pki.client_ca_file, key: garbage}))
    assert error.value.key == key
    expected = "not a PEM private key" if key == "key" else "not a PEM certificate"
    assert error.value.problem == f"{garbage}: {expected}"


def test_check_tls_files_passes_when_the_dev_cert_is_to_be_generated(tmp_path: Path) -> None:
    check_tls_files(
        TlsSettings(
            cert=tmp_path / "server.pem", key=tmp_path / "server.key", generate_dev_cert=True
        )
    )


def test_check_tls_files_with_generate_still_checks_a_half_pair(pki: Pki) -> None:
    with pytest.raises(TlsFileError) as error:
        check_tls_files(pki.settings(key=pki.directory / "gone.key", generate_dev_cert=True))
    assert error.value.key == "key"


def test_server_tls_refuses_bad_files(pki: Pki) -> None:
    with pytest.raises(TlsFileError):
        ServerTls(pki.settings(cert=pki.directory / "missing.pem"))


def test_client_options_needs_cert_and_key_together(pki: Pki) -> None:
    with pytest.raises(TlsFileError) as error:
        client_options("localhost", pki.ca_file, pki.server_cert, None)
    assert error.value.key == "key"
