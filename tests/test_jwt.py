"""JWT sign-in: pinned algorithms, exp/nbf/aud/iss, the anchors' attacks (``alg: none``, an HS
token against a public key), the end of a session at exp, refresh, and ``gateway jwt``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth.tokens import check
from gateway.config import ConfigError, parse
from gateway.testing import MemoryGateway, StreamConnection
from gateway.transports.websocket.peer import CLOSE_AUTH
from tests.conftest import GATEWAY, TIMEOUT

SECRET = b"0123456789abcdef0123456789abcdef-dev-only"


def config(secret_file: Path, extra: str = "") -> str:
    return f"""
[roles.member]
publish = ["main"]
subscribe = ["main", "inbox.{{user}}"]

[auth]
jwt_algorithms = ["HS256"]
jwt_secret_file = "{secret_file}"
jwt_audience = "gateway"
jwt_issuer = "tests"
jwt_leeway = 0
{extra}
[auth.users.carol]
roles = ["member"]

[[listeners]]
name = "tcp"
type = "tcp"
port = 8006
auth = ["jwt"]
welcome = "hi {{user}}"

[[listeners]]
name = "lines"
type = "tcp"
port = 8007
format = "json"
auth = ["jwt"]

[[listeners]]
name = "ws"
type = "ws"
port = 8080
ping_interval = 0
auth = ["jwt"]
"""


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def gw(secret_file: Path) -> Iterator[MemoryGateway]:
    gateway = MemoryGateway(config(secret_file))
    yield gateway
    gateway.stop()


def token(
    sub: str | None = "carol",
    ttl: float = 600,
    key: Any = SECRET,
    alg: str = "HS256",
    **claims: Any,
) -> str:
    now = time.time()
    fields: dict[str, Any] = {"sub": sub, "exp": int(now + ttl), "aud": "gateway", "iss": "tests"}
    fields.update(claims)
    return jwt.encode({k: v for k, v in fields.items() if v is not None}, key, algorithm=alg)


def events(connection: StreamConnection) -> list[dict[str, Any]]:
    return [json.loads(line) for line in connection.lines()]


def test_a_raw_peer_signs_in_with_a_jwt(gw):
    raw = gw.connect("tcp")
    raw.send(b"AUTH jwt " + token().encode() + b"\nhello\n")
    assert raw.lines() == [b"hi carol"]
    # Roles from the user's table (no roles claim): may read inbox.carol, not inbox.dave.
    lines = gw.connect("lines")
    lines.send(json.dumps({"type": "auth", "jwt": token(roles=["member"])}).encode() + b"\n")
    assert events(lines)[0]["user"] == "carol"
    lines.send(
        b'{"type":"subscribe","channel":"inbox.carol"}\n{"type":"subscribe","channel":"inbox.dave"}\n'
    )
    assert [e.get("code", e["type"]) for e in events(lines)] == ["subscribed", "forbidden"]


def unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return part({"alg": "none", "typ": "JWT"}) + "." + part(claims) + "."


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512's
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: token(ttl=-5), id="expired"),
        pytest.param(lambda: token(nbf=int(time.time()) + 300), id="nbf-in-the-future"),
        pytest.param(lambda: token(aud="someone-else"), id="wrong-aud"),
        pytest.param(lambda: token(iss="mallory"), id="wrong-iss"),
        pytest.param(lambda: token(key=b"another secret of enough length!!"), id="bad-signature"),
        pytest.param(lambda: token(alg="HS512"), id="algorithm-not-pinned"),
        pytest.param(
            lambda: unsigned(
                {"sub": "carol", "exp": int(time.time()) + 600, "aud": "gateway", "iss": "tests"}
            ),
            id="alg-none",
        ),
        pytest.param(lambda: token(exp=None), id="no-exp"),
        pytest.param(lambda: token(sub=None), id="no-sub"),
    ],
)
def test_bad_tokens_are_refused(gw, bad):
    raw = gw.connect("tcp")
    raw.send(b"AUTH jwt " + bad().encode() + b"\n")
    assert raw.lines() == [b"gateway: authentication failed"]
    assert raw.closed


def test_an_hs_token_is_never_checked_with_a_public_key_as_its_secret(tmp_path: Path):
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(public)
    text = (
        f'[auth]\njwt_algorithms = ["ES256"]\njwt_public_key_file = "{tmp_path / "pub.pem"}"\n'
        '[[listeners]]\nname = "t"\ntype = "tcp"\nport = 1\nauth = ["jwt"]\n'
    )
    settings = parse(tomllib.loads(text), "c.toml").auth.jwt
    assert settings is not None
    good = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert check(settings, good) is not None
    # The classic confusion: an HMAC token whose "secret" is the public key.
    forged = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"sub": "x", "exp": int(time.time()) + 60}).encode())
    head = forged + "." + body.rstrip(b"=").decode()
    mac = hmac.new(public, head.encode(), hashlib.sha256).digest()
    assert check(settings, head + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()) is None


@pytest.mark.parametrize("kind", ["raw", "json", "ws"])
def test_a_jwt_session_ends_at_exp(gw, kind):
    short = token(ttl=3)
    if kind == "ws":
        client = gw.websocket("ws")
        client.sendMessage(b"AUTH jwt " + short.encode())
        gw.flush()
        gw.advance(3.5)
        assert client.closed is not None and client.closed[1] == CLOSE_AUTH
        assert "gateway: authentication expired" in client.texts()
        return
    listener = "tcp" if kind == "raw" else "lines"
    client = gw.connect(listener)
    first = (
        b"AUTH jwt " + short.encode()
        if kind == "raw"
        else json.dumps({"type": "auth", "jwt": short}).encode()
    )
    client.send(first + b"\n")
    client.lines()
    gw.advance(3.5)
    if kind == "raw":
        assert client.lines() == [b"gateway: authentication expired"]
    else:
        assert events(client)[-1]["code"] == "auth_expired"
    assert client.closed
    assert gw.bus.metrics.disconnects["auth_expired"] == 1


def test_a_json_client_extends_its_session_with_a_new_jwt(gw):
    client = gw.connect("lines")
    client.send(json.dumps({"type": "auth", "jwt": token(ttl=3)}).encode() + b"\n")
    events(client)
    longer = token(ttl=600)
    client.send(json.dumps({"type": "auth", "jwt": longer}).encode() + b"\n")
    answer = events(client)[0]
    assert answer["type"] == "authenticated" and answer["user"] == "carol"
    assert answer["exp"] == jwt.decode(longer, options={"verify_signature": False})["exp"]
    gw.advance(10)
    assert not client.closed
    # Another user's token does not take the session over.
    client.send(json.dumps({"type": "auth", "jwt": token(sub="dave")}).encode() + b"\n")
    assert events(client)[0]["code"] == "auth_failed"
    assert not client.closed


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('jwt_algorithms = ["none"]\n', '"none" is not accepted'),
        ('jwt_algorithms = ["HS256", "RS256"]\n', "do not mix HMAC"),
        ("jwt_algorithms = []\n", "jwt_algorithms: missing"),
        ('jwt_algorithms = ["HS256"]\n', "jwt_secret_file: missing"),
        ('jwt_algorithms = ["RS256"]\njwt_public_key_file = "SECRET"\n', "not a PEM public key"),
        ('jwt_algorithms = ["HS256"]\njwt_secret_file = "SHORT"\n', "at least 32 bytes"),
    ],
)
def test_jwt_config_errors(tmp_path: Path, keys, message):
    (tmp_path / "short").write_bytes(b"too short")
    (tmp_path / "secret").write_bytes(SECRET)
    keys = keys.replace("SECRET", str(tmp_path / "secret")).replace(
        "SHORT", str(tmp_path / "short")
    )
    text = f'[auth]\n{keys}[[listeners]]\nname = "t"\ntype = "tcp"\nport = 1\n'
    with pytest.raises(ConfigError, match=message):
        parse(tomllib.loads(text), "c.toml")


def test_jwt_on_a_listener_needs_the_jwt_keys():
    text = '[[listeners]]\nname = "t"\ntype = "tcp"\nport = 1\nauth = ["jwt"]\n'
    with pytest.raises(ConfigError, match='"jwt" needs'):
        parse(tomllib.loads(text), "c.toml")


def test_gateway_jwt_mints_a_token_the_gateway_accepts(tmp_path: Path, secret_file: Path):
    path = tmp_path / "gateway.toml"
    path.write_text(config(secret_file))
    result = subprocess.run(
        [
            *GATEWAY,
            "jwt",
            "--sub",
            "carol",
            "--roles",
            "member",
            "--ttl",
            "60",
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    settings = parse(tomllib.loads(path.read_text()), str(path), path).auth.jwt
    assert settings is not None
    claims = check(settings, minted)
    assert claims is not None and claims.user == "carol" and claims.roles == ("member",)
    assert SECRET.decode() not in result.stdout + result.stderr
