"""``gateway passwd`` and ``gateway token new``, run as the real command."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from gateway.auth.credentials import password_hash_error, token_digest, verify_password
from tests.conftest import GATEWAY, TIMEOUT


def _gateway(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*GATEWAY, *args], input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def test_passwd_prints_a_hash_of_the_piped_password():
    result = _gateway("passwd", stdin="correct horse ✓\n".encode())
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert result.stdout == stored + "\n"
    assert stored.startswith("$argon2id$")
    assert password_hash_error(stored) is None
    assert verify_password(stored, "correct horse ✓")
    assert not verify_password(stored, "correct horse ✓\n")
    assert "[auth.users." in result.stderr
    assert "password = " in result.stderr
    assert "correct horse" not in result.stdout + result.stderr


def test_passwd_reads_a_last_line_without_newline():
    result = _gateway("passwd", stdin=b"no newline")
    assert result.returncode == 0, result.stderr
    assert verify_password(result.stdout.strip(), "no newline")


def test_passwd_user_prints_the_whole_table():
    result = _gateway("passwd", "--user", "alice", stdin=b"s3cret\n")
    assert result.returncode == 0, result.stderr
    user = tomllib.loads(result.stdout)["auth"]["users"]["alice"]
    assert user["roles"] == []
    assert verify_password(user["password"], "s3cret")


def test_passwd_user_quotes_a_dotted_name():
    result = _gateway("passwd", "--user", "ops.alice", stdin=b"s3cret\n")
    assert result.returncode == 0, result.stderr
    assert verify_password(
        tomllib.loads(result.stdout)["auth"]["users"]["ops.alice"]["password"], "s3cret"
    )


@pytest.mark.parametrize("stdin", [b"", b"\n", b"\r\n"])
def test_passwd_refuses_an_empty_password(stdin):
    result = _gateway("passwd", stdin=stdin)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "empty password" in result.stderr


def test_passwd_refuses_a_password_that_is_not_utf8():
    result = _gateway("passwd", stdin=b"\xff\xfe\n")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "UTF-8" in result.stderr


def _token_and_table(stdout: str) -> tuple[str, dict[str, object]]:
    lines = stdout.splitlines()
    assert "only this once" in lines[0]
    token = lines[2]
    return token, tomllib.loads("\n".join(lines[3:]))


def test_token_new_prints_a_token_once_and_the_table_of_its_digest():
    result = _gateway("token", "new", "billing-service")
    assert result.returncode == 0, result.stderr
    token, config = _token_and_table(result.stdout)
    assert len(token) >= 43
    entry = config["auth"]["tokens"]["billing-service"]  # type: ignore[index]
    assert entry == {"sha256": token_digest(token), "roles": []}
    assert result.stdout.count(token) == 1
    assert token not in result.stderr


def test_token_new_quotes_a_name_with_dots_and_colons():
    result = _gateway("token", "new", "svc.api:v2")
    assert result.returncode == 0, result.stderr
    token, config = _token_and_table(result.stdout)
    entry = config["auth"]["tokens"]["svc.api:v2"]  # type: ignore[index]
    assert entry["sha256"] == token_digest(token)


def test_each_token_is_new():
    first, _ = _token_and_table(_gateway("token", "new", "a").stdout)
    second, _ = _token_and_table(_gateway("token", "new", "a").stdout)
    assert first != second


@pytest.mark.parametrize("name", ["a b", ".hidden", "x" * 65, "a/b", 'q"uote', "é"])
def test_token_new_refuses_a_bad_name(name):
    result = _gateway("token", "new", name)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "not a name" in result.stderr


def test_token_needs_an_action():
    result = _gateway("token")
    assert result.returncode == 2
    assert result.stdout == ""


def test_the_help_documents_both():
    passwd = _gateway("passwd", "--help")
    assert passwd.returncode == 0
    assert "argon2id" in passwd.stdout
    token = _gateway("token", "new", "--help")
    assert token.returncode == 0
    assert "SHA-256" in token.stdout
