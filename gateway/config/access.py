"""Reading who may do what: ``[roles.NAME]``, ``[auth]``, and each listener's access keys.

A listener others can reach (bound off loopback, or to an endpoint string
other than ``unix:``) must say who may use it: ``auth`` (sign-in methods)
and/or ``anonymous_role``; else the config is refused, naming the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.auth.credentials import password_hash_error, token_digest_error
from gateway.auth.identities import Token, User
from gateway.auth.roles import LISTS, USER, Role, pattern_error
from gateway.auth.tokens import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, JwtSettings
from gateway.config.listeners import NAME_RE, ListenerConfig, StreamListenerConfig
from gateway.config.settings import AuthSettings
from gateway.config.tables import Table, show
from gateway.core.channels import PATTERN_RULE


def _names(table: Table, key: str, what: str) -> tuple[str, ...]:
    value = table.data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise table.error(key, f"expected a list of {what}, got {show(value)}")
    return tuple(value)


def _entries(
    parent: Table, key: str, what: str, keys: tuple[str, ...]
) -> Iterator[tuple[str, Table]]:
    """The ``[KEY.NAME]`` tables of ``parent``, each NAME checked, each with only ``keys``."""
    section = parent.table(key)
    for name in section.data:
        if not NAME_RE.match(name):
            raise section.error(name, f"expected a {what} name of letters, digits, . _ : -")
        entry = section.table(name)
        entry.check_keys(keys)
        yield name, entry


def parse_roles(root: Table) -> dict[str, Role]:
    roles = {}
    for name, role in _entries(root, "roles", "role", LISTS):
        lists: dict[str, tuple[str, ...]] = {}
        for key in LISTS:
            patterns = _names(role, key, "channel patterns")
            for pattern in patterns:
                problem = pattern_error(pattern)
                if problem is not None:
                    raise role.error(
                        key,
                        f"{show(pattern)}: {problem}; expected {PATTERN_RULE} ({USER} may "
                        "stand for the user's name)",
                    )
            lists[key] = patterns
        roles[name] = Role(name, **lists)
    return roles


def _roles_of(table: Table, roles: Mapping[str, Role]) -> tuple[str, ...]:
    names = _names(table, "roles", "role names")
    for name in names:
        if name not in roles:
            known = ", ".join(sorted(roles)) or "none"
            raise table.error("roles", f"no [roles.{name}] table (roles defined: {known})")
    return names


JWT_KEYS = (
    "jwt_algorithms",
    "jwt_secret_file",
    "jwt_public_key_file",
    "jwt_audience",
    "jwt_issuer",
    "jwt_leeway",
)


def _jwt(table: Table, base: Path) -> JwtSettings | None:
    if not any(key in table.data for key in JWT_KEYS):
        return None
    algorithms = _names(table, "jwt_algorithms", 'JWT algorithms such as ["HS256"]')
    if not algorithms:
        raise table.error("jwt_algorithms", 'missing: pin the algorithms, e.g. ["HS256"]')
    known = HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS
    for name in algorithms:
        if name not in known:
            raise table.error(
                "jwt_algorithms",
                f"{show(name)} is not accepted; expected some of {', '.join(known)}",
            )
    hmac = algorithms[0] in HMAC_ALGORITHMS
    if any((name in HMAC_ALGORITHMS) != hmac for name in algorithms):
        raise table.error(
            "jwt_algorithms", "do not mix HMAC (HS*) and public-key algorithms: pick one kind"
        )
    wanted, other = (
        ("jwt_secret_file", "jwt_public_key_file")
        if hmac
        else ("jwt_public_key_file", "jwt_secret_file")
    )
    if other in table.data:
        raise table.error(other, f"does not go with jwt_algorithms {show(list(algorithms))}")
    path = table.path(wanted, base, required=True)
    assert path is not None
    try:
        key = path.read_bytes()
    except OSError as e:
        raise table.error(wanted, f"cannot read {path}: {e.strerror or e}") from None
    if hmac:
        key = key.strip()
        if len(key) < 32:
            raise table.error(wanted, f"{path}: the secret must be at least 32 bytes")
    else:
        try:
            serialization.load_pem_public_key(key)
        except ValueError:
            raise table.error(wanted, f"{path}: not a PEM public key") from None
    return JwtSettings(
        algorithms=algorithms,
        key=key,
        key_file=path,
        audience=table.string("jwt_audience", "") or None,
        issuer=table.string("jwt_issuer", "") or None,
        leeway=table.number("jwt_leeway", 30.0, 0.0, 3600.0),
    )


def parse_auth(root: Table, roles: Mapping[str, Role], base: Path) -> AuthSettings:
    table = root.table("auth")
    table.check_keys(("users", "tokens", *JWT_KEYS))
    users = {}
    for name, user in _entries(table, "users", "user", ("password", "roles")):
        password = None
        if "password" in user.data:
            password = user.string("password", what="a password hash")
            problem = password_hash_error(password)
            if problem is not None:
                raise user.error("password", problem)  # the value itself is never shown
        users[name] = User(name, password, _roles_of(user, roles))
    tokens = {}
    for name, token in _entries(table, "tokens", "token", ("sha256", "roles")):
        digest = token.string("sha256", what='a SHA-256 hex digest (from "gateway token new")')
        problem = token_digest_error(digest)
        if problem is not None:
            raise token.error("sha256", problem)
        tokens[name] = Token(name, digest.lower(), _roles_of(token, roles))
    return AuthSettings(users=users, tokens=tokens, jwt=_jwt(table, base))


def check_access(
    table: Table, listener: ListenerConfig, roles: Mapping[str, Role], auth: AuthSettings
) -> None:
    """A listener others can reach is never open by accident; what it names exists."""
    role = listener.anonymous_role
    if role is not None and role not in roles:
        known = ", ".join(sorted(roles)) or "none"
        raise table.error("anonymous_role", f"no [roles.{role}] table (roles defined: {known})")
    methods = listener.auth
    if methods and listener.type == "udp":
        raise table.error(
            "auth", "a udp listener cannot sign peers in; give it an anonymous_role instead"
        )
    if "jwt" in methods and auth.jwt is None:
        raise table.error("auth", '"jwt" needs [auth] jwt_algorithms and its key file')
    tls = listener.tls_settings
    if "cert" in methods and (tls is None or tls.client_ca is None):
        raise table.error(
            "auth", '"cert" needs a tls, wss or dtls listener with client_ca (client certificates)'
        )
    if role is None and not methods and not listener.local:
        where = (
            listener.endpoint
            if isinstance(listener, StreamListenerConfig) and listener.endpoint
            else listener.host
        )
        raise table.error(
            "anonymous_role",
            f"missing: the listener is reachable from other hosts ({where}), so it may not be "
            "open to everyone; set auth (sign-in methods) and/or anonymous_role to a "
            '[roles.NAME] table saying what peers may do (e.g. publish = [">"], subscribe = '
            '[">"] to stay open on purpose), or bind it to loopback (host = "127.0.0.1")',
        )
