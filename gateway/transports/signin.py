"""Signing in on the wire, the same on every stream transport.

A peer of a listener with ``auth`` joins the bus only once it has signed in
with its first message, within ``limits.auth_timeout`` of connecting (after
the TLS handshake): ``AUTH token <token>`` or ``AUTH password <user>
<password>`` as the first line (raw WebSocket: the first text message), or
``{"type":"auth","token":...}`` / ``{"type":"auth","user":...,"password":...}``
from a JSON client. A verified client certificate signs in by itself (``cert``).
With an ``anonymous_role``, a first message that is no sign-in makes the peer
anonymous and is then an ordinary message. Whatever the client sends after its
first message waits, unread, until the outcome is known, so nothing is lost.
Secrets are never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall

from gateway.auth.identities import Authenticator, Identity

AUTH_FAILED = "authentication failed"
AUTH_TIMED_OUT = "authentication timed out"


@dataclass(frozen=True)
class Attempt:
    """What a first message presents. ``secret`` is never logged or kept."""

    method: str  # "password", "token" or "jwt"
    secret: str
    user: str = ""

    def __repr__(self) -> str:  # never the secret, whatever prints it
        return f"Attempt({self.method!r}, user={self.user!r})"


MALFORMED = Attempt("", "")
"""A sign-in attempt that names no usable credentials: a failure."""


def parse_attempt(data: bytes, json_client: bool) -> Attempt | None:
    """The sign-in attempt ``data`` (a first message) is, ``MALFORMED`` for a broken one,
    or None when it is no sign-in at all."""
    if json_client:
        return _json_attempt(data)
    if not data.startswith(b"AUTH "):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return MALFORMED
    parts = text.split(" ", 2)
    if len(parts) < 3 or not parts[2]:
        return MALFORMED
    method, rest = parts[1], parts[2]
    if method == "password":
        user, _, password = rest.partition(" ")
        return Attempt("password", password, user) if user and password else MALFORMED
    if method in ("token", "jwt"):
        return Attempt(method, rest)
    return MALFORMED


def _json_attempt(data: bytes) -> Attempt | None:
    if data.lstrip()[:1] != b"{":
        return None
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or fields.get("type") != "auth":
        return None
    for method in ("token", "jwt"):
        if method in fields:
            value = fields[method]
            return Attempt(method, value) if isinstance(value, str) and value else MALFORMED
    user, password = fields.get("user"), fields.get("password")
    if isinstance(user, str) and user and isinstance(password, str) and password:
        return Attempt("password", password, user)
    return MALFORMED


class SigningIn(Protocol):
    """The peer being signed in (a ``StreamPeer``)."""

    def _signed_in(self, identity: Identity | None, first_is_ordinary: bool) -> None: ...

    def _sign_in_failed(self, reason: str) -> None: ...


class PendingSignIn:
    """One connection between its handshake and its sign-in."""

    def __init__(
        self,
        peer: SigningIn,
        authenticator: Authenticator,
        methods: tuple[str, ...],
        anonymous: bool,
        json_client: bool,
        deadline: IDelayedCall,
        on_outcome: Callable[[str, str], None],
    ) -> None:
        self.peer = peer
        self.authenticator = authenticator
        self.methods = methods
        self.anonymous = anonymous
        self.json_client = json_client
        self.deadline = deadline
        # Called with (method, result) for the metrics and the lockout.
        self.on_outcome = on_outcome
        self.checking = False  # the first message arrived; its verdict is awaited
        self.finished = False

    def certificate(self, subject: str | None) -> bool:
        """A verified client certificate: signed in by it if its name is a user."""
        if "cert" not in self.methods or not subject:
            return False
        identity = self.authenticator.by_certificate(subject)
        if identity is None:
            return False
        self._succeed(identity, False)
        return True

    def first(self, data: bytes) -> None:
        """The client's first message (empty for one that cannot be a sign-in)."""
        self.checking = True
        attempt = parse_attempt(data, self.json_client) if data else None
        if attempt is None:
            if self.anonymous:
                self._succeed(None, True)
            else:
                self._fail("none", AUTH_FAILED)
            return
        if attempt.method not in self.methods:
            self._fail(attempt.method or "none", AUTH_FAILED)
            return
        # A password is checked off the reactor thread; meanwhile nothing more is read.
        method = attempt.method
        checked = self.authenticator.check(method, attempt.secret, attempt.user)
        checked.addCallbacks(
            lambda identity: self._verdict(method, identity),
            lambda failure: self._verdict(method, None),
        )

    def _verdict(self, method: str, identity: Identity | None) -> None:
        if self.finished:
            return  # timed out, or the connection went, while it was checked
        if identity is None:
            self._fail(method, AUTH_FAILED)
        else:
            self._succeed(identity, False)

    def expired(self) -> None:
        """``auth_timeout`` passed without a verdict."""
        if not self.finished:
            self._fail("none", AUTH_TIMED_OUT, timed_out=True)

    def cancel(self) -> None:
        """The connection is gone: no verdict matters any more."""
        self.finished = True
        if self.deadline.active():
            self.deadline.cancel()

    def _succeed(self, identity: Identity | None, first_is_ordinary: bool) -> None:
        self.cancel()
        self.on_outcome(identity.method if identity else "anonymous", "ok")
        self.peer._signed_in(identity, first_is_ordinary)

    def _fail(self, method: str, reason: str, timed_out: bool = False) -> None:
        self.cancel()
        self.on_outcome(method, "timeout" if timed_out else "failed")
        self.peer._sign_in_failed(reason)


NOBODY = Identity("", "none")
"""What ``header_identity`` fires with for credentials that do not sign anyone in."""


def header_identity(
    header: str, methods: tuple[str, ...], authenticator: Authenticator
) -> Deferred[Identity]:
    """Who an HTTP ``Authorization`` header signs in: ``Bearer <token or JWT>`` or
    ``Basic <user:password>``, among the listener's ``methods``; ``NOBODY`` when it signs
    nobody in."""
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer" and value:
        identity = authenticator.by_token(value) if "token" in methods else None
        if identity is None and "jwt" in methods:
            identity = authenticator.by_jwt(value)
        return succeed(identity or NOBODY)
    if scheme == "basic" and value and "password" in methods:
        try:
            user, colon, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return succeed(NOBODY)
        if colon and user and password:
            checked = authenticator.by_password(user, password)
            return checked.addCallback(lambda identity: identity or NOBODY)
    return succeed(NOBODY)
