"""``gateway passwd``, ``gateway token new`` and ``gateway jwt``: make credentials.

Neither keeps or logs a secret: ``passwd`` prints only the hash of the password it
reads, ``token new`` prints the fresh token once (for the client) and its digest (for
the config).
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from typing import Any, TextIO

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
COMMANDS = ("passwd", "token", "jwt")

PASSWD_HELP = "hash a password for a user of the config ([auth.users.NAME])"
PASSWD_DESCRIPTION = (
    "Read a password and print its argon2id hash, the value of password = in a "
    "[auth.users.NAME] table of the config. On a terminal the password is asked for twice "
    "and not echoed; otherwise one line of standard input is read (its newline removed), "
    'as in: printf "%s\\n" "$PASSWORD" | gateway passwd. The password itself is never '
    "printed or stored."
)
TOKEN_HELP = "make a bearer token for a client ([auth.tokens.NAME])"
TOKEN_NEW_DESCRIPTION = (
    "Make a fresh random token and print it once, to give to the client, then the "
    "[auth.tokens.NAME] table to paste into the config: it keeps only the token's SHA-256, "
    "so a lost token cannot be shown again; make a new one. NAME is 1 to 64 letters, "
    "digits and . _ : - (starting with a letter or digit)."
)


def add_commands(commands: Any) -> None:
    """Add ``passwd`` and ``token`` to the ``gateway`` command's subparsers."""
    passwd = commands.add_parser("passwd", help=PASSWD_HELP, description=PASSWD_DESCRIPTION)
    passwd.add_argument(
        "--user",
        metavar="NAME",
        type=_name,
        help="print the whole [auth.users.NAME] table (with roles = []) instead of the hash",
    )
    token = commands.add_parser("token", help=TOKEN_HELP, description=TOKEN_HELP + ".")
    actions = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    new = actions.add_parser(
        "new", help="make a fresh token NAME", description=TOKEN_NEW_DESCRIPTION
    )
    new.add_argument("name", metavar="NAME", type=_name, help="the token's name in the config")
    _add_jwt(commands)


JWT_HELP = "mint a development JWT with the config's HS secret (auth.jwt_secret_file)"


def _add_jwt(commands: Any) -> None:
    mint = commands.add_parser("jwt", help=JWT_HELP, description=JWT_HELP + ".")
    mint.add_argument("--sub", required=True, metavar="USER", help="the user (the sub claim)")
    mint.add_argument("--roles", metavar="A,B", help="a roles claim (default: the user's own)")
    mint.add_argument(
        "--ttl", type=float, default=3600.0, metavar="SECONDS", help="lifetime (default 3600)"
    )
    mint.add_argument("--config", required=True, metavar="FILE", help="the gateway's config")


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names (one of ``COMMANDS``); the exit code."""
    if args.command == "passwd":
        return passwd(args.user, sys.stdin, sys.stdout, sys.stderr)
    if args.command == "jwt":
        return jwt_mint(args, sys.stdout, sys.stderr)
    return token_new(args.name, sys.stdout)


def jwt_mint(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``gateway jwt``: a token the config's HS secret signs (for development)."""
    from pathlib import Path

    from gateway.auth.tokens import mint
    from gateway.config import ConfigError, load

    try:
        config = load(Path(args.config))
    except ConfigError as e:
        print(f"gateway jwt: {e}", file=err)
        return 2
    settings = config.auth.jwt
    if settings is None or not settings.hmac:
        print(
            "gateway jwt: the config has no HS* jwt_algorithms with a jwt_secret_file "
            "(tokens for public-key algorithms are signed by their issuer)",
            file=err,
        )
        return 2
    if args.ttl <= 0:
        print("gateway jwt: --ttl must be positive", file=err)
        return 2
    roles = None if args.roles is None else tuple(r for r in args.roles.split(",") if r)
    print(mint(settings, args.sub, roles, args.ttl), file=out)
    return 0


def passwd(user: str | None, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """``gateway passwd [--user NAME]``."""
    from gateway.auth.credentials import hash_password

    password = _read_password(stdin, err)
    if password is None:
        return 1
    hashed = hash_password(password)
    table = f"[auth.users.{_key(user or 'NAME')}]"
    if user is None:
        print(hashed, file=out)
        print(f'gateway passwd: in the config, under {table}: password = "{hashed}"', file=err)
    else:
        print(table, f'password = "{hashed}"', "roles = []", sep="\n", file=out)
        print("gateway passwd: paste these lines into the config, and name the roles", file=err)
    return 0


def _read_password(stdin: TextIO, err: TextIO) -> str | None:
    try:
        if stdin.isatty():
            password = getpass.getpass("Password: ")
            if password and getpass.getpass("Again: ") != password:
                print("gateway passwd: the two entries differ; nothing printed", file=err)
                return None
        else:
            password = _line(stdin)
    except (EOFError, KeyboardInterrupt):
        print("\ngateway passwd: no password read", file=err)
        return None
    except UnicodeDecodeError:
        print("gateway passwd: the password is not UTF-8 text", file=err)
        return None
    if not password:
        print("gateway passwd: an empty password is refused", file=err)
        return None
    return password


def _line(stdin: TextIO) -> str:
    """One line of ``stdin``, read as UTF-8 whatever the locale, without its newline."""
    buffer = getattr(stdin, "buffer", None)
    line = stdin.readline() if buffer is None else buffer.readline().decode("utf-8")
    return str(line).removesuffix("\n").removesuffix("\r")


def token_new(name: str, out: TextIO) -> int:
    """``gateway token new NAME``."""
    from gateway.auth.credentials import new_token, token_digest

    token = new_token()
    print(f"The token for {name}, shown only this once: give it to the client.", file=out)
    print("The gateway keeps only its digest; if it is lost, make a new one.", file=out)
    print(token, file=out)
    print("", "# Paste into the config:", f"[auth.tokens.{_key(name)}]", sep="\n", file=out)
    print(f'sha256 = "{token_digest(token)}"', "roles = []", sep="\n", file=out)
    return 0


def _name(text: str) -> str:
    if not NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a name: use 1 to 64 letters, digits and . _ : - "
            "(starting with a letter or digit)"
        )
    return text


def _key(name: str) -> str:
    """``name`` as a TOML key: quoted when it holds a dot or colon (never a nested table)."""
    return name if _BARE_KEY.fullmatch(name) else f'"{name}"'
