"""One peer lifecycle for every stream transport.

A connection is **admitted** (connection caps, sign-in lockout), gets a
**handshake deadline** when its transport has a handshake, **signs in** when
its listener has ``auth`` (``gateway.transports.signin``), **joins** (peer id,
origin, attach to the bus, the "connected" line, welcome, history), has
things **delivered** through its backlog (slow-consumer policy, counting per
message), and goes: closed, aborted, oversize or idle, each with one reason
that is logged and counted, then **detached**. ``StreamPeer`` is that
lifecycle for stream connections (tcp, tls, ws, wss); transports add only
their framing and handshakes. What all peers of one listener share is its
``ListenerRuntime`` (``gateway.transports.runtime``); UDP peers join and leave
through it too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from gateway.auth.identities import Identity
from gateway.auth.roles import Permissions
from gateway.core.interfaces import IFramer
from gateway.core.message import Origin
from gateway.flow.backpressure import SIGN_IN
from gateway.flow.connection import ConnectionFlow
from gateway.transports.address import describe
from gateway.transports.runtime import CONNECTION_LIMIT, ListenerRuntime, tell
from gateway.transports.sessions import JsonSession, Publish
from gateway.transports.signin import AUTH_FAILED, AUTH_TIMED_OUT, Attempt, PendingSignIn


class StreamPeer:
    """The lifecycle of one stream connection, mixed into each transport's protocol.

    The transport calls ``_admit`` when the connection is made, ``_join`` once
    its handshake (if any) is done, ``_speak_json`` for a JSON client and
    ``_request`` with what it sends, ``_gone`` (or ``_release``) when the
    connection is lost, and implements ``close`` and ``abort``.
    """

    # Not ``log``: Autobahn's protocols have a ``log`` of their own.
    peer_log = Logger()
    framer: IFramer
    transport: Any
    transport_name = ""
    refused_at = float("-inf")  # when the peer was last told of a refusal (raw peers)
    quiet = False  # True: a binary stream, into which the gateway writes no text of its own
    # Set only while signing in, and once signed in (class defaults: idle peers stay small).
    _signin: PendingSignIn | None = None
    _identity: Identity | None = None
    _own_permissions: Permissions | None = None
    _extra = ""  # what the "connected" line adds, e.g. ", json"
    _expiry: IDelayedCall | None = None  # a JWT session's end
    _since: tuple[int, str] | None = None  # a JSON client's place on its channel (a ws URL's)

    def _init_peer(self, runtime: ListenerRuntime, transport_name: str) -> None:
        self.runtime = runtime
        self.bus = runtime.bus
        self.transport_name = transport_name
        config = runtime.config
        self.channel = config.channel
        self.echo = config.echo
        self.origin = Origin("", config.name, transport_name)
        self.subject: str | None = None  # the TLS client certificate's subject, if any
        self.flow: ConnectionFlow | None = None
        self._closing = False
        self._close_reason: str | None = None
        self._deadline: IDelayedCall | None = None
        # JSON clients only: their requests and presence (``gateway.transports.sessions``).
        self._session: JsonSession | None = None

    # What the bus reads (IPeer)

    @property
    def address(self) -> str:
        """The remote address (worked out when asked: idle peers stay small)."""
        return describe(self.transport.getPeer()) if self.transport is not None else ""

    def _host(self) -> str | None:
        """The remote IP address (None for a transport without one, such as a unix socket)."""
        return getattr(self.transport.getPeer(), "host", None)

    @property
    def pending_bytes(self) -> int:
        return self.flow.backlog.pending if self.flow is not None else 0

    @property
    def dropped_messages(self) -> int:
        return self.flow.backlog.dropped_total if self.flow is not None else 0

    # Admit

    def _admit(self, write_through: bool = False, counted: bool = False) -> bool:
        """Count the connection against the caps; False (and aborted) when over one.

        ``counted``: the caps already counted it (a WebSocket that an HTTP
        connection upgraded); the peer takes that count over.
        """
        transport = self.transport
        self.flow = ConnectionFlow(self.runtime.governor, transport, self, write_through)
        remote = transport.getPeer()
        host = getattr(remote, "host", None) or describe(remote)
        if counted:
            self.flow.adopt(host)
        elif not self.flow.admit(host, self.runtime.name):
            self._closing = True
            self._close_reason = CONNECTION_LIMIT
            transport.abortConnection()
            return False
        if self.runtime.config.auth and self.runtime.context.lockout.refused(host):
            # Too many failed sign-ins from there: refused before costing anything more.
            self.bus.metrics.disconnect("auth_lockout")
            self._closing = True
            self._close_reason = CONNECTION_LIMIT
            transport.abortConnection()
            return False
        self.runtime.connections.add(self)
        return True

    # Handshake deadline

    def _arm_deadline(self, seconds: float) -> None:
        """From connect, not an idle timer: a client trickling handshake bytes is cut all the same."""
        self._deadline = self.runtime.clock.callLater(seconds, self._handshake_expired)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _handshake_expired(self) -> None:
        self._deadline = None
        self.bus.metrics.disconnect("handshake_timeout")
        self.abort(f"handshake not finished within {self.runtime.limits.handshake_timeout:g} s")

    # Join

    def _join(self, subject: str | None = None, extra: str = "") -> None:
        """The handshake is done: sign in first if the listener wants that, else attach."""
        self._disarm_deadline()
        self.subject = subject
        if extra:
            self._extra = extra
        assert self.flow is not None
        self.flow.start()
        runtime = self.runtime
        if not runtime.config.auth or self._identity is not None:
            self._attach()  # open, or signed in already (a WebSocket's Authorization header)
            return
        clock = runtime.clock
        self._signin = PendingSignIn(
            self,
            runtime.context.authenticator,
            runtime.config.auth,
            anonymous=runtime.config.anonymous_role is not None,
            json_client=self._session is not None,
            deadline=clock.callLater(runtime.limits.auth_timeout, self._sign_in_expired),
            on_outcome=self._sign_in_outcome,
        )
        self._signin.certificate(subject)

    def _attach(self) -> None:
        """Attach to the bus: id, origin, the log line, welcome, history."""
        identity = self._identity
        self.origin = self.runtime.new_origin(
            self.transport_name, self.subject, identity.user if identity else None
        )
        count = self.runtime.attach(self, extra=self._extra)  # type: ignore[arg-type]
        self._greet(count)

    # Sign in (``gateway.transports.signin``)

    def _sign_in(self, first: bytes, ordinary: bool = False) -> None:
        """The client's first message (``ordinary``: one that cannot be a sign-in, such as
        a binary WebSocket message); nothing more is read until the verdict."""
        signin = self._signin
        assert signin is not None and self.flow is not None
        self.flow.pause_reading(SIGN_IN)
        signin.first(b"" if ordinary else first)

    def _signed_in(self, identity: Identity | None, first_is_ordinary: bool) -> None:
        """Signed in (``identity``), or anonymous (``identity`` None): then its first
        message, when it sent one, was an ordinary message."""
        self._signin = None
        if identity is not None:
            self._become(identity)
        if self._closing:
            return
        self._attach()
        assert self.flow is not None
        self.flow.resume_reading(SIGN_IN)
        self._resume_input(first_is_ordinary)

    def _resume_input(self, first_is_ordinary: bool) -> None:
        """Handle what waited during sign-in, the first message too when it was an ordinary
        one (no sign-in: the peer is anonymous)."""
        raise NotImplementedError

    def _become(self, identity: Identity) -> None:
        """Be ``identity`` from now on (its roles, and its end for a JWT)."""
        self._take_roles(identity)
        self.runtime.identified.add(self)
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        if identity.ends_in is not None:
            self._expiry = self.runtime.clock.callLater(identity.ends_in, self._auth_expired)

    def _auth_expired(self) -> None:
        self._expiry = None
        if self._closing:
            return
        self._tell_unauthenticated("auth_expired", "authentication expired")
        self.bus.metrics.disconnect("auth_expired")
        self._close_unauthenticated("authentication expired")

    def _refresh(self, attempt: Attempt) -> None:
        """A signed-in JSON client's later ``auth``: a JWT for the same user extends it."""
        assert self._session is not None
        authenticator = self.runtime.context.authenticator
        current = self._identity
        new = authenticator.by_jwt(attempt.secret) if attempt.method == "jwt" else None
        ok = (
            new is not None
            and current is not None
            and current.method == "jwt"
            and new.user == current.user
            and "jwt" in self.runtime.config.auth
        )
        self.runtime.signed_in(self._host(), attempt.method, "ok" if ok else "failed")
        if not ok or new is None:
            reason = "only a JWT for the same user extends a JWT session"
            self._session.send({"type": "error", "code": "auth_failed", "reason": reason})
            return
        self._become(new)
        self._session.send({"type": "authenticated", "user": new.user, "exp": new.expires})
        for _, subscription in self.bus.recheck(only=self):  # type: ignore[arg-type]
            self.forbidden("subscribe", subscription)

    def _tell_unauthenticated(self, code: str, reason: str) -> None:
        if self._session is not None:
            self._session.send({"type": "error", "code": code, "reason": reason})
        else:
            tell(self, f"gateway: {reason}".encode(), self.channel)

    def _sign_in_failed(self, reason: str) -> None:
        self._signin = None
        if self._closing:
            return
        assert self.flow is not None
        self.flow.resume_reading(SIGN_IN)  # a closing handshake needs the client's answer
        self._tell_unauthenticated("auth_failed", reason)
        self.bus.metrics.disconnect("auth_failed")
        self._close_unauthenticated(reason)

    def _close_unauthenticated(self, reason: str) -> None:
        self.close(reason)

    def _sign_in_expired(self) -> None:
        if self._signin is not None:
            self._signin.expired()

    def _sign_in_outcome(self, method: str, result: str) -> None:
        self.runtime.signed_in(self._host(), method, result)

    def _stop_signing_in(self) -> None:
        if self._signin is not None:
            self._signin.cancel()
            self._signin = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _greet(self, count: int) -> None:
        """The welcome of a peer that just joined, then its channel's history (JSON clients:
        ``welcome``, and what they missed after ``_since``; else the ``welcome`` text)."""
        if self._session is not None:
            self._session.join(count, self._since)
            return
        text = self.runtime.welcome_text(count, self.origin)
        if text is not None:
            tell(self, text, self.channel)
        self.bus.replay_history(self)  # type: ignore[arg-type]

    # JSON clients

    def _speak_json(self, framer: IFramer) -> None:
        """From now on the client gets JSON events (``framer``) and may send requests."""
        self.framer = framer
        relays, presence = self.runtime.context.relays, self.runtime.config.presence
        self._session = JsonSession(self, self.bus, relays, presence=presence)  # type: ignore[arg-type]
        self._session.on_auth = self._refresh

    def _request(self, data: bytes) -> Publish | None:
        """What a JSON client sent: answered here (None), or what to publish."""
        assert self._session is not None
        return self._session.handle(data)

    def _stop_events(self) -> None:
        if self._session is not None:
            self._session.stop()

    # Permissions

    @property
    def permissions(self) -> Permissions | None:
        """What the signed-in user may do, else the listener's ``anonymous_role`` (IPeer)."""
        if self._identity is not None:
            return self._own_permissions
        return self.runtime.permissions

    @property
    def identity(self) -> Identity | None:
        """Who the peer signed in as (None: anonymous, or not yet)."""
        return self._identity

    def reauthorize(self, identity: Identity | None) -> None:
        """A reload: the peer's identity with its current roles, or None when revoked."""
        if identity is None:
            self.bus.metrics.disconnect("auth_revoked")
            self._close_unauthenticated("authentication revoked")
            return
        self._take_roles(identity)

    def _take_roles(self, identity: Identity) -> None:
        self._identity = identity
        self._own_permissions = self.runtime.context.authenticator.permissions(identity)

    def forbidden(self, action: str, channel: str) -> None:
        """IPeer: the gateway refused the peer ``action`` on ``channel``."""
        self.runtime.forbidden(self, self._session, action, channel)

    # Deliver

    def deliver(self, wire: Any) -> None:
        # Only attached peers get deliveries, and joining started the flow.
        self.flow.backlog.write(wire)  # type: ignore[union-attr]

    # Go

    def close(self, reason: str) -> None:
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        raise NotImplementedError

    def _leave(self, reason: str) -> None:
        """Stop being a peer now (the connection may linger): the one reason, then detach."""
        self._closing = True
        if self._close_reason is None:
            self._close_reason = reason
        self._stop_events()
        self.bus.detach(self)  # type: ignore[arg-type]

    def _cut_later(self) -> None:
        """Queued output may drain, but a peer that never reads (or never answers a
        close) must not hold the connection open forever."""
        if self._deadline is None and self.transport is not None:
            self._deadline = self.runtime.clock.callLater(
                self.runtime.close_timeout(), self.transport.abortConnection
            )

    def _oversize(self) -> None:
        """Count a message over ``max_message_bytes`` (the transport closes the peer)."""
        self.bus.metrics.drop("oversize")
        self.bus.metrics.disconnect("oversize")

    def slow_consumer(self) -> None:
        """FlowOwner: the peer does not read."""
        self.abort("slow consumer")

    def idle_timeout(self) -> None:
        """FlowOwner: the peer sent nothing for too long."""
        self.abort(f"idle for {self.runtime.limits.idle_timeout:g} s")

    def _gone(self, why: str) -> None:
        """The connection is lost: release everything, log the one reason."""
        self._release()
        if self._close_reason != CONNECTION_LIMIT:
            self._log_gone(why)

    def _release(self) -> None:
        """Give back what the connection held: the bus, its flow control, its place."""
        self._stop_signing_in()
        self._disarm_deadline()
        self._stop_events()
        self.bus.detach(self)  # type: ignore[arg-type]
        if self.flow is not None:
            self.flow.stop()
        self.runtime.connections.discard(self)
        self.runtime.identified.discard(self)

    def _log_gone(self, why: str) -> None:
        if self._close_reason is not None:
            why = self._close_reason
        if self.origin.peer_id:
            self.runtime.gone(self.origin.peer_id, why)
        elif why in (AUTH_FAILED, AUTH_TIMED_OUT):
            self.peer_log.info(
                '{address} did not sign in on listener "{listener}" ({reason})',
                address=self.address,
                listener=self.runtime.name,
                reason=why,
            )
        else:
            self._failed_handshake(why)

    def _failed_handshake(self, why: str) -> None:
        """The connection went before it joined."""
        self.bus.metrics.handshake_failed(self.runtime.name)
        self.peer_log.info(
            '{address} failed the handshake on listener "{listener}" ({reason})',
            address=self.address,
            listener=self.runtime.name,
            reason=why,
        )
