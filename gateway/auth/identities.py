"""Who may sign in, and checking what they present: passwords, tokens, certificates.

``[auth.users.NAME]`` has an optional ``password`` hash and ``roles``;
``[auth.tokens.NAME]`` has the ``sha256`` of an opaque token and ``roles`` (the
user is NAME). An ``Identity`` is who a peer signed in as; its permissions are
made from the roles in force (``Access``), so a reload that narrows a role
narrows every signed-in peer at once. The ``Authenticator`` holds the users
and tokens in force (replaced on reload) and checks credentials: tokens and
certificates at once, passwords off the reactor thread (``Verifier``).
Secrets are never logged, never kept beyond the check, never compared
other than in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed

from gateway.auth.credentials import token_digest
from gateway.auth.roles import Access, Permissions
from gateway.auth.tokens import JwtSettings, check, remaining
from gateway.auth.verifier import Verifier

METHODS = ("password", "token", "jwt", "cert")
"""Every sign-in method a listener's ``auth`` may list."""

# Checked when a user is unknown, so a wrong user name costs as long as a wrong password.
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzb21lc2FsdA$"
    "kPzd4rdG2zdrJ7kw8jFQzxFqsBBNRL31HaSdIvbTuQs"
)


@dataclass(frozen=True)
class User:
    """One ``[auth.users.NAME]`` table."""

    name: str
    password: str | None = None  # an argon2id or bcrypt hash; None: certificate only
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Token:
    """One ``[auth.tokens.NAME]`` table: the user NAME signs in with the token."""

    name: str
    sha256: str
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class Identity:
    """Who a peer signed in as, and how."""

    user: str
    method: str  # "password", "token", "jwt" or "cert"
    roles: tuple[str, ...] = ()
    credential: str = ""  # which token (its name) or user table it came from, for revocation
    ends_in: float | None = None  # a JWT's: seconds from signing in to exp + leeway
    expires: float | None = None  # a JWT's exp (seconds since the epoch)


class Authenticator:
    """The users and tokens in force, and the checks of what peers present."""

    def __init__(
        self,
        users: Mapping[str, User],
        tokens: Mapping[str, Token],
        access: Access,
        verifier: Verifier,
        jwt: JwtSettings | None = None,
    ) -> None:
        self.access = access
        self.verifier = verifier
        self.update(users, tokens, jwt)

    def update(
        self, users: Mapping[str, User], tokens: Mapping[str, Token], jwt: JwtSettings | None
    ) -> None:
        """New users, tokens and JWT settings (a reload)."""
        self.users = dict(users)
        self.tokens = dict(tokens)
        self.jwt = jwt
        self._by_digest = {token.sha256.lower(): token for token in tokens.values()}

    def check(self, method: str, secret: str, user: str = "") -> Deferred[Identity | None]:
        """Who ``secret`` (a "token", "jwt" or "password" of ``user``) signs in, or None:
        tokens and JWTs at once, passwords off the reactor thread."""
        if method == "password":
            return self.by_password(user, secret)
        if method == "token":
            return succeed(self.by_token(secret))
        if method == "jwt":
            return succeed(self.by_jwt(secret))
        return succeed(None)

    def by_token(self, token: str) -> Identity | None:
        try:
            digest = token_digest(token)
        except UnicodeEncodeError:  # a lone surrogate, from a JSON escape
            return None
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found.sha256.lower(), digest):
            return None
        return Identity(found.name, "token", found.roles, credential=found.name)

    def by_password(self, user: str, password: str) -> Deferred[Identity | None]:
        """Fires with the identity, or None; the hash is checked off the reactor thread."""
        found = self.users.get(user)
        stored = found.password if found is not None else None
        checked = self.verifier.verify(stored or _DUMMY_HASH, password)

        def verdict(ok: bool) -> Identity | None:
            # The user may have been removed while the hash was checked.
            current = self.users.get(user)
            if not ok or stored is None or current is None or current.password != stored:
                return None
            return Identity(user, "password", current.roles, credential=user)

        result: Deferred[Identity | None] = checked.addCallback(verdict)
        return result

    def by_jwt(self, token: str) -> Identity | None:
        """A valid JWT's identity: ``sub``, with the token's roles (else the user's)."""
        if self.jwt is None:
            return None
        claims = check(self.jwt, token)
        if claims is None:
            return None
        if claims.roles is not None:
            roles = claims.roles
        else:
            user = self.users.get(claims.user)
            roles = user.roles if user is not None else ()
        return Identity(
            claims.user,
            "jwt",
            roles,
            credential=claims.user,
            ends_in=remaining(self.jwt, claims),
            expires=claims.expires,
        )

    def by_certificate(self, name: str) -> Identity | None:
        """A verified client certificate naming ``name`` (its subject CN): a configured user."""
        found = self.users.get(name)
        if found is None:
            return None
        return Identity(name, "cert", found.roles, credential=name)

    def still_valid(self, identity: Identity) -> Identity | None:
        """After a reload: the identity with its current roles, or None when revoked."""
        if identity.method == "token":
            token = self.tokens.get(identity.credential)
            return (
                None
                if token is None
                else Identity(identity.user, "token", token.roles, identity.credential)
            )
        if identity.method in ("password", "cert"):
            user = self.users.get(identity.credential)
            return (
                None
                if user is None
                else Identity(identity.user, identity.method, user.roles, identity.credential)
            )
        return identity if self.jwt is not None else None  # a JWT's roles are its own

    def permissions(self, identity: Identity) -> Permissions:
        """What ``identity`` may do with the roles in force."""
        return self.access.for_user(identity.user, identity.roles)
