"""``dtls`` listeners: the ``udp`` listener's peers, inside DTLS 1.2 sessions.

A source gets no state until the DTLS cookie exchange has succeeded
(``gateway.dtls``: stateless, and never answered with more than it sent).
Then its session must finish the handshake within ``limits.handshake_timeout``
and, on a listener with ``auth``, sign in with its first record (``AUTH ...``,
or a JSON ``auth`` request) or its client certificate within
``limits.auth_timeout``. Only then is it a peer, exactly as a ``udp`` peer is
(``DatagramServer``: ``peer_timeout``, ``max_peers``, ``format``, history),
plus the listener's ``welcome``, with one message per application-data record
both ways. A session ends with a close_notify from either side, the peer's
``peer_timeout``, or the gateway stopping (which sends close_notify).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IListeningPort

from gateway.auth.identities import Identity
from gateway.auth.roles import Permissions
from gateway.config.listeners import DtlsListenerConfig
from gateway.config.settings import Limits
from gateway.dtls.records import is_client_hello
from gateway.dtls.server import DtlsServer, Outcome
from gateway.dtls.session import DtlsSession
from gateway.tls.files import TlsFileError, TlsSettings, load_material
from gateway.transports.address import host_port
from gateway.transports.datagram.server import (
    Address,
    DatagramListener,
    DatagramPeer,
    DatagramServer,
    message_of,
)
from gateway.transports.envelopes import event
from gateway.transports.listening import ListenError
from gateway.transports.runtime import GatewayContext, ListenerRuntime
from gateway.transports.signin import PendingSignIn

MAX_WAITING = 64
"""Records a session may send while its sign-in is checked; more are dropped (counted)."""


class DtlsPeer(DatagramPeer):
    """A DTLS session on the bus: every message leaves as one record."""

    def __init__(
        self, server: SecureDatagramServer, session: DtlsSession, identity: Identity | None
    ) -> None:
        runtime = server.runtime
        user = identity.user if identity is not None else None
        super().__init__(server, session.address, runtime.new_origin("dtls", session.subject, user))
        self.dtls = session
        self.subject = session.subject
        self.identity = identity
        self._own: Permissions | None = None
        if identity is not None:
            self._own = runtime.context.authenticator.permissions(identity)

    def send(self, datagrams: list[bytes]) -> None:
        refused = self.dtls.send_all(datagrams)
        if refused:
            self.server.bus.metrics.drop("dtls_too_large", refused)

    @property
    def permissions(self) -> Permissions | None:
        if self.identity is not None:
            return self._own
        return self.server.runtime.permissions

    def reauthorize(self, identity: Identity | None) -> None:
        """A reload: the peer's identity with its current roles, or None when revoked."""
        if identity is None:
            self.server.bus.metrics.disconnect("auth_revoked")
            self.close("authentication revoked")
            return
        self.identity = identity
        self._own = self.server.runtime.context.authenticator.permissions(identity)


class DtlsSignIn:
    """A session between its handshake and its sign-in (``SigningIn`` for ``PendingSignIn``)."""

    def __init__(self, server: SecureDatagramServer, session: DtlsSession) -> None:
        self.server = server
        self.session = session
        runtime = server.runtime
        config = server.config
        self.first = b""
        self.waiting: list[bytes] = []
        self.pending = PendingSignIn(
            self,
            runtime.context.authenticator,
            config.auth,
            anonymous=config.anonymous_role is not None,
            json_client=config.format == "json",
            deadline=runtime.clock.callLater(runtime.limits.auth_timeout, self._expired),
            on_outcome=lambda method, result: runtime.signed_in(session.address[0], method, result),
        )

    def start(self) -> None:
        self.pending.certificate(self.session.subject)

    def message(self, record: bytes) -> None:
        """A record that arrived before the verdict: the first signs in, the rest wait."""
        if self.pending.checking or self.pending.finished:
            if len(self.waiting) < MAX_WAITING:
                self.waiting.append(record)
            else:
                self.server.bus.metrics.drop("auth_pending")
            return
        message = message_of(record)
        if message:  # an empty line only keeps the session alive
            self.first = record
            self.pending.first(message)

    def _expired(self) -> None:
        self.pending.expired()

    def _signed_in(self, identity: Identity | None, first_is_ordinary: bool) -> None:
        waiting = [self.first, *self.waiting] if first_is_ordinary else self.waiting
        self.server.signed_in(self, identity, waiting)

    def _sign_in_failed(self, reason: str) -> None:
        self.server.sign_in_failed(self, reason)


class SecureDatagramServer(DatagramServer):
    """The DTLS sessions of one UDP port, and the peers they became."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__(runtime)
        self.engine: DtlsServer | None = None  # made when the port opens (TLS files load)
        self.sessions: dict[Address, DtlsSession] = {}
        # The handshake deadline of each session still handshaking (signing in has its own).
        self.deadlines: dict[DtlsSession, IDelayedCall] = {}
        self.signing_in: dict[DtlsSession, DtlsSignIn] = {}
        # Any record can be a whole handshake flight or the largest message.
        self.read_size = 65535

    # Datagrams in

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        address: Address = (addr[0], addr[1])
        session = self.sessions.get(address)
        if session is not None and not (session.handshake_done and is_client_hello(datagram)):
            messages = session.receive(datagram)
            if messages:
                self._records(session, messages)
            return
        self._stranger(datagram, address)

    def _records(self, session: DtlsSession, messages: list[bytes]) -> None:
        for message in messages:  # a sign-in may end between two records of one datagram
            peer = self.peers.get(session.address)
            if isinstance(peer, DtlsPeer) and peer.dtls is session:
                self.received(peer, message)
                continue
            signin = self.signing_in.get(session)
            if signin is not None:
                signin.message(message)

    def _stranger(self, datagram: bytes, address: Address) -> None:
        """A datagram from a source without a session (or a client starting a new one)."""
        ip = self._allowed_ip(address[0])
        if ip is None:
            self._ignore("udp_not_allowed", address, "its source is not in the allow list")
            return
        if address not in self.sessions and len(self.sessions) >= self.config.max_peers:
            self._ignore("udp_max_peers", address, f"max_peers ({self.config.max_peers}) reached")
            return
        # The host as sign-ins count it (DtlsSignIn): the source's own form.
        if self.config.auth and self.runtime.context.lockout.refused(address[0]):
            self._ignore("auth_lockout", address, "too many failed sign-ins from there")
            return
        assert self.engine is not None
        admission = self.engine.accept(datagram, address)
        if admission.outcome is Outcome.ACCEPTED:
            session = admission.session
            assert session is not None
            old = self.sessions.get(address)
            if old is not None:
                old.close("the client started a new session")
            self.sessions[address] = session
            self._deadline(session, self.runtime.limits.handshake_timeout, self._unfinished)
        elif admission.outcome is Outcome.BAD_COOKIE:
            self._ignore("dtls_bad_cookie", address, "a wrong or expired cookie")
        elif admission.outcome is Outcome.REFUSED:
            self._failed(address, admission.reason or "refused")
        elif admission.outcome is not Outcome.CHALLENGED:
            self._ignore("dtls_unverified", address, "not a DTLS 1.2 ClientHello")

    # What the sessions report (SessionOwner)

    def transmit(self, datagram: bytes, address: Address) -> None:
        self.write(datagram, address)

    def handshake_completed(self, session: DtlsSession) -> None:
        self._undeadline(session)
        if not self.config.auth:
            self._become_peer(session, None, [])
            return
        signin = self.signing_in[session] = DtlsSignIn(self, session)
        signin.start()

    def session_ended(self, session: DtlsSession, reason: str) -> None:
        address = session.address
        if self.sessions.get(address) is session:
            del self.sessions[address]
        self._undeadline(session)
        signin = self.signing_in.pop(session, None)
        if signin is not None:
            signin.pending.cancel()
        peer = self.peers.get(address)
        if isinstance(peer, DtlsPeer) and peer.dtls is session:
            self.forget(peer, reason)
        elif not session.handshake_done:
            self._failed(address, reason)
        elif signin is not None:
            self.log.info(
                '{address} did not sign in on listener "{listener}" ({reason})',
                address=host_port(*address),
                listener=self.config.name,
                reason=reason,
            )

    # Sign-in (``DtlsSignIn``)

    def signed_in(
        self, signin: DtlsSignIn, identity: Identity | None, waiting: list[bytes]
    ) -> None:
        session = signin.session
        if self.signing_in.pop(session, None) is None or session.ended:
            return
        peer = self._become_peer(session, identity, waiting)
        if identity is not None:
            self.runtime.identified.add(peer)

    def sign_in_failed(self, signin: DtlsSignIn, reason: str) -> None:
        session = signin.session
        self.bus.metrics.disconnect("auth_failed")
        if self.config.format == "json":
            told = event({"type": "error", "code": "auth_failed", "reason": reason})
        else:
            told = f"gateway: {reason}".encode()
        session.send(told + b"\n")
        session.close(reason)

    # Peers

    def _become_peer(
        self, session: DtlsSession, identity: Identity | None, waiting: list[bytes]
    ) -> DtlsPeer:
        peer = DtlsPeer(self, session, identity)
        self.join(peer)
        for message in waiting:
            self.received(peer, message)
        return peer

    def forget(self, peer: DatagramPeer, reason: str) -> None:
        """Detach ``peer`` and end its session (close_notify), whatever ended it."""
        super().forget(peer, reason)
        if isinstance(peer, DtlsPeer):
            self.runtime.identified.discard(peer)
            peer.dtls.close(reason)

    def stopProtocol(self) -> None:
        super().stopProtocol()
        for session in list(self.sessions.values()):
            session.close("gateway stopping")

    # Deadlines and failures

    def _deadline(self, session: DtlsSession, seconds: float, expired: Any) -> None:
        self.deadlines[session] = self.clock.callLater(seconds, expired, session)

    def _undeadline(self, session: DtlsSession) -> None:
        deadline = self.deadlines.pop(session, None)
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _unfinished(self, session: DtlsSession) -> None:
        self.deadlines.pop(session, None)
        self.bus.metrics.disconnect("handshake_timeout")
        limit = self.runtime.limits.handshake_timeout
        session.close(f"handshake not finished within {limit:g} s")

    def _failed(self, address: Address, reason: str) -> None:
        self.bus.metrics.handshake_failed(self.config.name)
        self.log.info(
            '{address} failed the DTLS handshake on listener "{listener}" ({reason})',
            address=host_port(*address),
            listener=self.config.name,
            reason=reason,
        )


class DtlsMaterial:
    """The listener's certificate material, reloadable as a TLS listener's is."""

    def __init__(self, settings: TlsSettings, server: SecureDatagramServer, mtu: int) -> None:
        self.settings = settings
        self.engine = DtlsServer(load_material(settings), server, server.clock, mtu=mtu)

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    def reload(self) -> None:
        self.engine.reload(load_material(self.settings))


class DtlsListener(DatagramListener):
    """A ``dtls`` listener."""

    server: SecureDatagramServer

    def make_server(self) -> SecureDatagramServer:
        return SecureDatagramServer(self.runtime)

    async def open(self, reactor: Any) -> IListeningPort:
        config = self.config
        assert isinstance(config, DtlsListenerConfig)
        try:
            material = DtlsMaterial(config.tls, self.server, config.mtu)
        except TlsFileError as e:
            raise ListenError(f'listener "{config.name}": {e.key}: {e.problem}') from e
        self.server.engine = material.engine
        self.server_tls = material
        return await super().open(reactor)

    def peer_count(self) -> int:
        return len(self.server.peers)


def build(config: DtlsListenerConfig, limits: Limits, context: GatewayContext) -> DtlsListener:
    return DtlsListener(ListenerRuntime(config, limits, context))
