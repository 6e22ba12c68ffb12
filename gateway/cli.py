"""The ``gateway`` command. The only module that touches the global reactor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner

from gateway import __version__
from gateway.config import Config, ConfigError, load

log = Logger(namespace="gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Multi-protocol broadcast gateway: TCP, UDP (and more) peers on one bus.",
    )
    parser.add_argument("--config", metavar="PATH", help="the TOML config file to run")
    parser.add_argument("--check", action="store_true", help="validate the config file and exit")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    client = commands.add_parser(
        "client",
        help="a terminal client: prints what it receives, sends each line of stdin",
        description="Connect to a gateway listener; print every message received, send each "
        "line of standard input; exit on end of input or when the server closes.",
    )
    client.add_argument("url", help="tcp://HOST:PORT or udp://HOST:PORT")
    client.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="udp: send an empty datagram this often so the gateway keeps us (default 20)",
    )
    return parser


def main(argv: list[str] | None = None) -> NoReturn:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "client":
        _run_client(args.url, args.keepalive)
    if args.config is None:
        parser.error("give --config PATH to run a gateway, or a command such as 'client'")
    try:
        config = load(Path(args.config))
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    if args.check:
        print(f"{args.config}: ok ({len(config.listeners)} listeners)")
        sys.exit(0)
    _run(config)


def _run(config: Config) -> NoReturn:
    from twisted.internet.task import react

    from gateway.logs import observer

    globalLogBeginner.beginLoggingTo([observer(sys.stdout)], redirectStandardIO=False)
    react(lambda r: Deferred.fromCoroutine(_serve(r, config)), [])
    raise AssertionError("react() returned")  # pragma: no cover


def _run_client(url: str, keepalive: float) -> NoReturn:
    from twisted.internet.task import react

    from gateway import client

    async def session(reactor: Any) -> None:
        code = await client.run(reactor, url, keepalive=keepalive)
        raise SystemExit(code)

    react(lambda r: Deferred.fromCoroutine(session(r)), [])
    raise AssertionError("react() returned")  # pragma: no cover


async def _serve(reactor: Any, config: Config) -> None:
    from gateway.service import GatewayService, ListenError

    service = GatewayService(config, reactor)
    try:
        await service.listen()
    except ListenError as e:
        print(f"gateway: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    service.startService()  # type: ignore[no-untyped-call]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info(
        "gateway {name!r} {version} running ({count} listeners); Ctrl-C or SIGTERM stops it",
        name=config.gateway.name,
        version=__version__,
        count=len(config.listeners),
    )
    await Deferred()  # until a signal stops the reactor
