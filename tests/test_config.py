"""Config validation: every mistake is one line naming the file and the key, status 2."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError, TcpListenerConfig, UdpListenerConfig, parse
from tests.conftest import GATEWAY

GOOD = """
[gateway]
name = "gw"

[limits]
max_message_bytes = 65536

[[listeners]]
name = "tcp"
type = "tcp"
host = "127.0.0.1"
port = 8006
channel = "main"
welcome = "Welcome to the gateway, you are client number {count}!"
quit_command = "close"
echo = false

[[listeners]]
name = "udp"
type = "udp"
port = 8008
peer_timeout = 60
"""


def test_the_documented_shape_parses_into_typed_frozen_objects():
    config = parse(tomllib.loads(GOOD), "config.toml")
    tcp, udp = config.listeners
    assert isinstance(tcp, TcpListenerConfig)
    assert (tcp.name, tcp.type, tcp.host, tcp.port, tcp.channel) == (
        "tcp",
        "tcp",
        "127.0.0.1",
        8006,
        "main",
    )
    assert tcp.quit_command == "close" and tcp.echo is False
    assert isinstance(udp, UdpListenerConfig)
    assert (udp.host, udp.channel, udp.peer_timeout, udp.max_peers) == (
        "127.0.0.1",
        "main",
        60.0,
        1024,
    )
    assert config.gateway.name == "gw"
    assert config.limits.max_message_bytes == 65536
    with pytest.raises(AttributeError):
        tcp.port = 1  # type: ignore[misc]


def test_defaults():
    config = parse(tomllib.loads('[[listeners]]\nname = "t"\ntype = "tcp"\nport = 0\n'), "c.toml")
    (tcp,) = config.listeners
    assert isinstance(tcp, TcpListenerConfig)
    assert (tcp.host, tcp.channel, tcp.welcome, tcp.quit_command, tcp.echo) == (
        "127.0.0.1",
        "main",
        "",
        "",
        False,
    )
    assert config.gateway.name == "gateway"
    assert config.limits.max_message_bytes == 65536


@pytest.mark.parametrize("host", ["::", "0.0.0.0", "::1", "127.0.0.2"])
def test_hosts(host):
    # Reachable from other hosts: open only on purpose, with a role saying what peers may do.
    role = 'anonymous_role = "all"\n[roles.all]\npublish = [">"]\n'
    config = parse(
        tomllib.loads(
            f'[[listeners]]\nname = "t"\ntype = "tcp"\nhost = "{host}"\nport = 0\n{role}'
        ),
        "c",
    )
    assert config.listeners[0].host == host


BASE_TCP = '[[listeners]]\nname = "tcp"\ntype = "tcp"\nport = 8006\n'
BASE_UDP = '[[listeners]]\nname = "udp"\ntype = "udp"\nport = 8008\n'

ERRORS = [
    (
        BASE_TCP + BASE_UDP.replace("8008", '"80a"'),
        'c.toml: listeners[1].port: expected an integer 0-65535, got "80a"',
    ),
    (
        BASE_TCP.replace("8006", "70000"),
        "c.toml: listeners[0].port: expected an integer 0-65535, got 70000",
    ),
    (
        BASE_TCP.replace("8006", "true"),
        "c.toml: listeners[0].port: expected an integer 0-65535, got true",
    ),
    (BASE_TCP + "prot = 1\n", 'c.toml: listeners[0].prot: unknown key (did you mean "port"?)'),
    (
        BASE_TCP + BASE_TCP.replace("8006", "8007"),
        'c.toml: listeners[1].name: duplicate listener name "tcp"',
    ),
    (
        BASE_TCP + BASE_TCP.replace('"tcp"\ntype', '"tcp2"\ntype'),
        "c.toml: listeners[1].port: another stream listener already uses 127.0.0.1 port 8006",
    ),
    (
        BASE_TCP.replace('type = "tcp"', 'type = "sctp"'),
        'c.toml: listeners[0].type: expected one of tcp, tls, ws, wss, udp, dtls, got "sctp"',
    ),
    (BASE_TCP.replace('name = "tcp"\n', ""), "c.toml: listeners[0].name: missing (required)"),
    (BASE_TCP.replace("port = 8006\n", ""), "c.toml: listeners[0].port: missing (required)"),
    (BASE_TCP + 'host = "localhost:80"\n', "c.toml: listeners[0].host: expected an IP address"),
    (BASE_TCP + "echo = 1\n", "c.toml: listeners[0].echo: expected true or false, got 1"),
    (BASE_TCP + 'channel = "has space"\n', "c.toml: listeners[0].channel: expected a channel name"),
    (
        BASE_TCP + 'welcome = "hi {who}"\n',
        "c.toml: listeners[0].welcome: unknown placeholder {who}",
    ),
    (BASE_TCP + 'welcome = "hi {count"\n', "c.toml: listeners[0].welcome: bad template"),
    (BASE_TCP + "peer_timeout = 5\n", "c.toml: listeners[0].peer_timeout: unknown key"),
    (
        BASE_UDP + "peer_timeout = -1\n",
        "c.toml: listeners[0].peer_timeout: expected a number of seconds",
    ),
    (BASE_UDP + 'quit_command = "x"\n', "c.toml: listeners[0].quit_command: unknown key"),
    (
        "[limits]\nmax_message_bytes = 0\n" + BASE_TCP,
        "c.toml: limits.max_message_bytes: expected an integer 1-",
    ),
    (
        "[limits]\nmax_mesage_bytes = 10\n" + BASE_TCP,
        'c.toml: limits.max_mesage_bytes: unknown key (did you mean "max_message_bytes"?)',
    ),
    ("[gateway]\nname = 5\n" + BASE_TCP, "c.toml: gateway.name: expected a string, got 5"),
    ("[gatway]\n" + BASE_TCP, 'c.toml: gatway: unknown key (did you mean "gateway"?)'),
    ("", "c.toml: listeners: missing: add at least one [[listeners]] table"),
    ("listeners = 3\n", "c.toml: listeners: expected [[listeners]] tables"),
    (
        '[limits]\nslow_consumer = "ignore"\n' + BASE_TCP,
        'c.toml: limits.slow_consumer: expected "disconnect" or "drop"',
    ),
    (
        "[limits]\nmax_total_pending_bytes = 10\n" + BASE_TCP,
        "c.toml: limits.max_total_pending_bytes: expected an integer >= 65536",
    ),
    (
        BASE_UDP + 'allow = ["10.0.0.0/33"]\n',
        "c.toml: listeners[0].allow: expected networks in CIDR form",
    ),
    (BASE_UDP + "challenge = 1\n", "c.toml: listeners[0].challenge: expected true or false"),
    (
        '[gateway]\nlog_level = "loud"\n' + BASE_TCP,
        "c.toml: gateway.log_level: expected one of debug, info, warn, error",
    ),
    (
        '[gateway]\nlog_format = "xml"\n' + BASE_TCP,
        'c.toml: gateway.log_format: expected "text" or "json"',
    ),
    (
        "[gateway]\nworkers = 2\n" + BASE_TCP,
        "c.toml: gateway.workers: more than 1 worker needs a [cluster] table",
    ),
    (
        '[cluster]\nredis = "http://x"\n' + BASE_TCP,
        "c.toml: cluster.redis: expected a redis:// or rediss:// URL",
    ),
    ('[admin]\nhost = "127.0.0.1"\n' + BASE_TCP, "c.toml: admin.port: missing (required)"),
    (
        "[channels.main]\nhistroy = 5\n" + BASE_TCP,
        'c.toml: channels.main.histroy: unknown key (did you mean "history"?)',
    ),
    (
        "[channels.main]\nhistory = -1\n" + BASE_TCP,
        "c.toml: channels.main.history: expected an integer 0-100000",
    ),
    (
        BASE_TCP + 'endpoint = "unix:/tmp/x"\n',
        "c.toml: listeners[0].port: give either endpoint or host/port, not both",
    ),
]


@pytest.mark.parametrize(("toml", "message"), ERRORS)
def test_errors_name_the_key(toml, message):
    with pytest.raises(ConfigError) as caught:
        parse(tomllib.loads(toml), "c.toml")
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def _run_check(
    tmp_path: Path, text: str | None, name: str = "config.toml"
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    return subprocess.run(
        [*GATEWAY, "--config", str(path)], capture_output=True, text=True, timeout=20, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE_TCP + BASE_UDP.replace("8008", '"80a"'),
            'listeners[1].port: expected an integer 0-65535, got "80a"',
        ),
        (BASE_TCP + "prot = 1\n", "listeners[0].prot: unknown key"),
        (BASE_TCP + BASE_TCP, 'listeners[1].name: duplicate listener name "tcp"'),
        ("[[listeners]\n", "invalid TOML"),
        (None, "cannot read the file: No such file or directory"),
        (b"\xff\xfe".decode("latin-1"), "invalid TOML"),
    ],
)
def test_command_exits_2_with_one_line(tmp_path, text, expected):
    result = _run_check(tmp_path, text)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(str(tmp_path / "config.toml") + ": ")
    assert expected in lines[0]
    assert result.stdout == ""


def test_check_reports_errors_too(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE_TCP + 'echo = "yes"\n')
    result = subprocess.run(
        [*GATEWAY, "--config", str(path), "--check"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f'{path}: listeners[0].echo: expected true or false, got "yes"'


@pytest.mark.parametrize(
    ("channel", "ok"),
    [
        ("room.42", True),
        ("user@example.org/x", True),
        ("x" * 128, True),
        ("room.*", False),
        ("room.>", False),
        ("a..b", False),
        ("x" * 129, False),
        ("", False),
    ],
)
def test_a_listener_channel_is_a_channel_name(channel, ok):
    text = GOOD.replace('channel = "main"', f'channel = "{channel}"')
    if ok:
        assert parse(tomllib.loads(text), "c.toml").listeners[0].channel == channel
    else:
        with pytest.raises(ConfigError) as error:
            parse(tomllib.loads(text), "c.toml")
        assert str(error.value).startswith("c.toml: listeners[0].channel: expected a channel name")


def test_channel_tables_may_name_patterns_and_the_most_specific_wins():
    text = (
        GOOD
        + """
[channels."room.*"]
history = 5
[channels."room.>"]
history = 7
[channels."room.lobby"]
history = 9
[channels.">"]
history = 1
"""
    )
    config = parse(tomllib.loads(text), "c.toml")
    assert config.channel("room.lobby").history == 9  # its own table
    assert config.channel("room.42").history == 5  # "*" is more specific than ">"
    assert config.channel("room.42.chat").history == 7
    assert config.channel("elsewhere").history == 1
    assert parse(tomllib.loads(GOOD), "c.toml").channel("room.42").history == 0


def test_a_channel_table_must_be_a_name_or_a_pattern():
    with pytest.raises(ConfigError) as error:
        parse(tomllib.loads(GOOD + '[channels."room.>.x"]\nhistory = 1\n'), "c.toml")
    assert str(error.value).startswith("c.toml: channels.room.>.x: expected a channel name")
