"""Passwords and tokens at rest: hashing, verification and the checks of stored values.

Sans I/O. A user's password is kept as an argon2id hash (argon2-cffi, its RFC 9106
low-memory defaults) or, for hashes brought from elsewhere, a bcrypt hash (pyca
bcrypt); a token is kept as the SHA-256 of its text, which is enough for a random
256-bit secret and cheap enough to check on the reactor thread. Password hashing is
slow on purpose: run :func:`verify_password` through ``gateway.auth.verifier``,
never on the reactor thread.

A stored value is checked by its ``*_error`` function when the config is loaded;
:func:`verify_password` applies the same check first, so it only ever hands the
libraries a hash of the shape they are known to accept, and a malformed one is a
mismatch rather than an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError

BCRYPT_MAX_BYTES = 72
"""bcrypt reads no further than this many bytes of a password."""

EXPECTED = (
    'expected an argon2id hash made by "gateway passwd" ($argon2id$...) or a bcrypt hash ($2b$...)'
)

# $argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>: libargon2's own order of the
# fields, its base64 without padding.
_ARGON2ID = re.compile(
    r"\$argon2id\$v=(?P<v>1[69])\$m=(?P<m>[1-9][0-9]{0,9}),t=(?P<t>[1-9][0-9]{0,9}),"
    r"p=(?P<p>[1-9][0-9]{0,7})\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<hash>[A-Za-z0-9+/]+)"
)
# $2b$12$<22 characters of salt><31 of hash>, in bcrypt's base64; the salt's last
# character holds 2 bits, so only four characters may end it.
_BCRYPT = re.compile(
    r"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{31}"
)
_HEX_DIGEST = re.compile(r"[0-9A-Fa-f]{64}")
_MAX_U32 = 2**32 - 1
_MAX_LANES = 2**24 - 1
_MIN_SALT = 8
_MIN_OUTPUT = 4

_hasher = PasswordHasher()  # stateless: its parameters only


def hash_password(password: str) -> str:
    """An argon2id PHC string of ``password`` with a fresh random salt."""
    return _hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` is the one ``stored`` (an argon2id or bcrypt hash) was made of.

    False on a mismatch, on a malformed or unsupported hash, and for a password
    longer than bcrypt reads (72 UTF-8 bytes) against a bcrypt hash: it is refused
    rather than silently cut. Never raises for bad input. Slow on purpose.
    """
    if password_hash_error(stored) is not None:
        return False
    try:
        secret = password.encode("utf-8")
        if stored.startswith("$argon2id$"):
            return _hasher.verify(stored, secret)
        if len(secret) > BCRYPT_MAX_BYTES:
            return False
        return bcrypt.checkpw(secret, stored.encode("ascii"))
    except (VerificationError, ValueError):  # a mismatch, an unencodable password
        return False


def password_hash_error(stored: str) -> str | None:
    """None if ``stored`` is a well-formed argon2id or bcrypt hash, else why not."""
    if stored.startswith("$argon2id$"):
        reason = _argon2id_error(stored)
        return None if reason is None else f"a malformed argon2id hash ({reason})"
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        if _BCRYPT.fullmatch(stored):
            return None
        return "a malformed bcrypt hash (expected $2b$, a cost of 04 to 31, then 53 characters)"
    if stored.startswith(("$argon2i$", "$argon2d$")):
        return f"{stored.split('$')[1]} is not supported; {EXPECTED}"
    if stored.startswith("$"):
        return f"an unsupported kind of hash; {EXPECTED}"
    return f"not a password hash (a plain-text password?); {EXPECTED}"


def _argon2id_error(stored: str) -> str | None:
    match = _ARGON2ID.fullmatch(stored)
    if match is None:
        return "expected $argon2id$v=19$m=...,t=...,p=...$<salt>$<hash>"
    memory, time, lanes = int(match["m"]), int(match["t"]), int(match["p"])
    if time > _MAX_U32 or memory > _MAX_U32 or lanes > _MAX_LANES:
        return "a parameter out of range"
    if memory < 8 * lanes:
        return "m must be at least 8 times p"
    salt, output = _unpadded_b64(match["salt"]), _unpadded_b64(match["hash"])
    if salt is None or output is None:
        return "bad base64"
    if len(salt) < _MIN_SALT:
        return "a salt shorter than 8 bytes"
    if len(output) < _MIN_OUTPUT:
        return "a hash shorter than 4 bytes"
    return None


def _unpadded_b64(text: str) -> bytes | None:
    """The bytes of unpadded standard base64, None unless it is their one spelling."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).rstrip(b"=").decode("ascii") == text else None


def new_token() -> str:
    """A fresh random opaque token (256 bits, URL-safe text), never starting with ``-``:
    a command line would take such a token (``--token -x...``) for an option."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def token_digest(token: str) -> str:
    """The lowercase hex SHA-256 of the token's UTF-8 bytes: what the config keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(stored_hex: str, token: str) -> bool:
    """Whether ``token`` is the one ``stored_hex`` is the digest of (hex in either case).

    Compares in constant time; False for a malformed digest or an unencodable token.
    """
    if token_digest_error(stored_hex) is not None:
        return False
    try:
        digest = token_digest(token)
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(digest, stored_hex.lower())


def token_digest_error(stored_hex: str) -> str | None:
    """None if ``stored_hex`` is a SHA-256 digest in hex, else why not."""
    if _HEX_DIGEST.fullmatch(stored_hex):
        return None
    return 'expected the 64 hex digits of a SHA-256 digest, as "gateway token new" prints'
