"""The ``gateway`` command. The only module that touches the global reactor."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.logger import Logger, globalLogBeginner

from gateway import __version__
from gateway.cli import auth_tools, top
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
    # Set by the supervisor of `workers = N` for each worker it starts (gateway.workers).
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    client = commands.add_parser(
        "client",
        help="a terminal client: prints what it receives, sends each line of stdin",
        description="Connect to a gateway listener; print every message received, send each "
        "line of standard input; exit on end of input or when the server closes.",
    )
    client.add_argument(
        "url",
        help="tcp://HOST:PORT, tls://HOST:PORT, udp://HOST:PORT, dtls://HOST:PORT, "
        "ws://HOST:PORT/ws or wss://HOST:PORT/ws",
    )
    client.add_argument(
        "--ca", metavar="PEM", help="tls, wss, dtls: trust this CA (default: the system's)"
    )
    client.add_argument("--cert", metavar="PEM", help="tls, dtls: client certificate (mutual TLS)")
    client.add_argument("--key", metavar="PEM", help="tls, dtls: private key of --cert")
    client.add_argument(
        "--json",
        action="store_true",
        help="speak JSON envelopes: send each line as a message (JSON objects as they are), "
        "print events as JSON (ws/wss: the gateway.v1.json subprotocol; tcp/tls/udp: a "
        'format = "json" listener)',
    )
    client.add_argument(
        "--subscribe",
        action="append",
        default=[],
        metavar="CHANNEL",
        help="subscribe to a channel name or pattern once connected (repeatable; implies --json)",
    )
    client.add_argument(
        "--token", metavar="TOKEN", help="sign in with this token (a listener with auth)"
    )
    client.add_argument("--jwt", metavar="JWT", help="sign in with this JSON Web Token")
    client.add_argument("--user", metavar="NAME", help="sign in as this user (with --password)")
    client.add_argument(
        "--password",
        metavar="PASSWORD",
        help="--user's password (default: asked for on the terminal when --user is given)",
    )
    client.add_argument(
        "--keepalive",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="udp: send a hello datagram this often so the gateway keeps us (default 20, "
        "0 = once); dtls: an empty record (0 = never)",
    )
    certs = commands.add_parser(
        "certs",
        help="make a development CA and certificates for tls/wss listeners",
        description="Write a dev CA (ca.pem, ca.key), a server certificate (server.pem, "
        "server.key) and optionally a client certificate (NAME.pem, NAME.key). Key files are "
        "mode 0600. Existing files are never replaced without --force.",
    )
    certs.add_argument("--dir", default="certs", help="folder to write to (default: certs)")
    certs.add_argument(
        "--host",
        action="append",
        metavar="NAME_OR_IP",
        help="a host the server certificate is for; repeat for several "
        "(default: localhost, 127.0.0.1, ::1)",
    )
    certs.add_argument("--client", metavar="NAME", help="also make a client certificate NAME")
    certs.add_argument("--force", action="store_true", help="replace existing files")
    auth_tools.add_commands(commands)
    top.add_commands(commands)
    # Listed here; its arguments live in gateway.bench, loaded only when it runs.
    commands.add_parser("bench", help=BENCH_HELP, add_help=False)
    return parser


BENCH_HELP = "a load generator: subscribers and publishers on any transport"


def _bench(argv: list[str]) -> NoReturn:
    from gateway import bench

    parser = argparse.ArgumentParser(
        prog="gateway bench",
        description="Measure fan-out: deliveries/s, loss, latency, server CPU and memory.",
    )
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "client":
        _run_client(args)
    if args.command == "certs":
        sys.exit(_make_certs(args))
    if args.command in auth_tools.COMMANDS:
        sys.exit(auth_tools.run(args))
    if args.command in top.COMMANDS:
        sys.exit(top.run(args))
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
    if args.worker is not None:
        from gateway.ops.workers import WorkerSpec, worker_config

        spec = WorkerSpec.parse(args.worker)
        _run(worker_config(config, spec), worker=True, prepare=lambda c: worker_config(c, spec))
    _run(config, supervise=Path(args.config) if config.gateway.workers > 1 else None)


def _run(
    config: Config,
    worker: bool = False,
    supervise: Path | None = None,
    prepare: Callable[[Config], Config] | None = None,
) -> NoReturn:
    from twisted.internet import reactor
    from twisted.internet.task import react

    from gateway.ops.logs import observer

    settings = config.gateway
    globalLogBeginner.beginLoggingTo(
        [observer(sys.stdout, settings.log_level, settings.log_format, reactor)],
        redirectStandardIO=False,
    )
    if supervise is not None:
        from gateway.ops.supervisor import supervise as run_workers

        react(lambda r: Deferred.fromCoroutine(run_workers(r, config, supervise)), [])
    react(lambda r: Deferred.fromCoroutine(_serve(r, config, worker, prepare)), [])
    raise AssertionError("react() returned")  # pragma: no cover


def _make_certs(args: argparse.Namespace) -> int:
    from gateway.tls.devcerts import DEFAULT_HOSTS, make_dev_pki
    from gateway.tls.pki import PkiError

    try:
        made = make_dev_pki(
            Path(args.dir), tuple(args.host or DEFAULT_HOSTS), client=args.client, force=args.force
        )
    except PkiError as e:
        print(f"gateway certs: {e}", file=sys.stderr)
        return 1
    for path in made.written:
        print(f"wrote {path}")
    for path in made.kept:
        print(f"kept {path}")
    print(f"dev CA SHA-256 fingerprint: {made.ca_fingerprint}")
    return 0


def _run_client(args: argparse.Namespace) -> NoReturn:
    from twisted.internet.task import react

    from gateway.cli import client
    from gateway.cli.speech import Speech

    async def session(reactor: Any) -> None:
        code = await client.run(
            reactor,
            args.url,
            keepalive=args.keepalive,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            speech=Speech(args.json, args.subscribe, _sign_in(args)),
        )
        raise SystemExit(code)

    react(lambda r: Deferred.fromCoroutine(session(r)), [])
    raise AssertionError("react() returned")  # pragma: no cover


async def _serve(
    reactor: Any,
    config: Config,
    worker: bool = False,
    prepare: Callable[[Config], Config] | None = None,
) -> None:
    from gateway.server import GatewayService, ListenError

    service = GatewayService(config, reactor, reuse_port=worker, prepare=prepare)
    try:
        await service.listen()
    except ListenError as e:
        print(f"gateway: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if worker:
        from gateway.ops.workers import worker_started

        worker_started(reactor)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(service.reload))
    log.info(
        "gateway {name!r} {version} running ({count} listeners); Ctrl-C or SIGTERM stops it",
        name=config.gateway.name,
        version=__version__,
        count=len(config.listeners),
    )
    await Deferred()  # until a signal stops the reactor


def _sign_in(args: argparse.Namespace) -> tuple[str, ...]:
    """What ``gateway client`` signs in with: ("token", TOKEN), ("jwt", JWT),
    ("password", USER, PASSWORD) or nothing."""
    if args.token:
        return ("token", args.token)
    if args.jwt:
        return ("jwt", args.jwt)
    if args.user:
        password = args.password
        if password is None:
            import getpass

            password = getpass.getpass(f"Password for {args.user}: ")
        return ("password", args.user, password)
    return ()
