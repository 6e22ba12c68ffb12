"""JSON Web Tokens (``auth = ["jwt"]``), checked with PyJWT against pinned algorithms.

``[auth]`` names the algorithms (``jwt_algorithms``: all HMAC, ``HS*``, with
``jwt_secret_file``; or all public-key, ``RS*``/``PS*``/``ES*``/``EdDSA``, with
``jwt_public_key_file``; never ``none``, never both kinds, so an HMAC token can
never be checked with a public key as its secret), and optionally
``jwt_audience``, ``jwt_issuer`` and ``jwt_leeway`` (seconds, default 30).
``exp`` and ``sub`` are required; ``sub`` is the user; roles come from the
``roles`` claim (names of configured roles; unknown ones count for nothing),
else from ``[auth.users.<sub>]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


@dataclass(frozen=True)
class JwtSettings:
    """The ``jwt_*`` keys of ``[auth]``; ``key`` is the secret or public key, read at load."""

    algorithms: tuple[str, ...]
    key: bytes = field(repr=False)
    key_file: Path
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 30.0

    @property
    def hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS


@dataclass(frozen=True)
class Claims:
    """What a valid token says."""

    user: str
    expires: float  # its exp, seconds since the epoch
    roles: tuple[str, ...] | None  # its roles claim; None: take the user's


def check(settings: JwtSettings, token: str) -> Claims | None:
    """The claims of ``token`` when it is valid now (signature, exp, nbf, aud, iss), else None."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.key,
            algorithms=list(settings.algorithms),
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=settings.leeway,
            options={"require": ["exp", "sub"]},
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    user, expires = claims.get("sub"), claims.get("exp")
    if not isinstance(user, str) or not user or not isinstance(expires, int | float):
        return None
    roles = claims.get("roles")
    if isinstance(roles, list):
        named: tuple[str, ...] | None = tuple(r for r in roles if isinstance(r, str))
    else:
        named = None
    return Claims(user, float(expires), named)


def remaining(settings: JwtSettings, claims: Claims) -> float:
    """Seconds until a session signed in with ``claims`` ends (``exp`` + leeway)."""
    return max(0.0, claims.expires + settings.leeway - time.time())


def mint(settings: JwtSettings, user: str, roles: tuple[str, ...] | None, ttl: float) -> str:
    """A development token for ``user`` signed with the configured HMAC secret."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + int(ttl)}
    if roles is not None:
        claims["roles"] = list(roles)
    if settings.audience is not None:
        claims["aud"] = settings.audience
    if settings.issuer is not None:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, settings.key, algorithm=settings.algorithms[0])
