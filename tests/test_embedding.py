"""docs/embedding.md: every example there runs, exactly as written, and does what it says."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

from websockets.sync.client import connect as ws_connect

from tests.conftest import TIMEOUT, Line, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "embedding.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", re.DOTALL)


def examples() -> dict[str, str]:
    return dict(EXAMPLE.findall(DOC.read_text()))


def test_the_page_has_its_examples():
    assert set(examples()) == {"embed.py", "twist", "test_with_memory_gateway.py"}


def test_memory_gateway_example_passes():
    module = types.ModuleType("test_with_memory_gateway")
    exec(compile(examples()["test_with_memory_gateway.py"], str(DOC), "exec"), module.__dict__)
    tests = [value for name, value in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_embedded_gateway_app_peer_and_mounted_websocket(tmp_path: Path):
    (tmp_path / "embed.py").write_text(examples()["embed.py"])
    tcp_port, web_port = free_port(), free_port()
    (tmp_path / "gateway.toml").write_text(
        f'[[listeners]]\nname = "tcp"\ntype = "tcp"\nport = {tcp_port}\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "embed.py", "gateway.toml", str(web_port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(tcp_port, proc)
        wait_for_port(web_port, proc)
        line = Line(tcp_port)
        with ws_connect(f"ws://127.0.0.1:{web_port}/live", open_timeout=TIMEOUT) as browser:
            line.send(b"ping\n")
            answer = line.line()  # the application peer answered the sender, and everyone
            assert re.fullmatch(rb"pong to tcp-\d+", answer), answer
            assert browser.recv(timeout=TIMEOUT) == "ping"
            assert browser.recv(timeout=TIMEOUT) == answer.decode()
            browser.send("from the mounted endpoint")
            assert line.line() == b"from the mounted endpoint"
        line.close()
    finally:
        code = _stop(proc)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, output


def test_twist_runs_the_gateway_plugin(tmp_path: Path):
    port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[[listeners]]\nname = "tcp"\ntype = "tcp"\nport = {port}\nwelcome = "hi {{peer}}"\n'
    )
    command = examples()["twist"].split()
    assert command[:2] == ["twist", "gateway"]
    twist = Path(sys.executable).with_name("twist")
    # An editable install leaves twisted/plugins/ in the source tree, where Twisted finds
    # plugins on the path; an installed gateway puts it into Twisted's own plugin folder.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [str(twist), *command[1:]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc)
        first, second = Line(port), Line(port)
        assert re.fullmatch(rb"hi tcp-\d+", first.line())  # the config's welcome
        assert re.fullmatch(rb"hi tcp-\d+", second.line())
        first.send(b"through twist\n")
        assert second.line() == b"through twist"
        first.close()
        second.close()
    finally:
        code = _stop(proc)
    output = proc.stdout.read().decode() if proc.stdout else ""
    # Twisted's runner ends by re-raising the signal it stopped for, so the exit
    # status says SIGTERM; the gateway drained first all the same.
    assert code == -signal.SIGTERM, output
    assert '"log_format": "stopped"' in output
