"""``gateway bench``: a load generator for the gateway (and for servers it is compared with).

N subscribers spread over the given URLs (tcp, tls, udp, ws, wss, and nats or
nats+ws for nats-server), M publishers, fixed-size messages, flood or
fixed-rate. Each message carries its publisher, a sequence number and its
send time (CLOCK_MONOTONIC, shared by all processes of a machine), so the
bench reports deliveries per second, loss and latency percentiles; given the
server's PID, also the server's CPU and memory from ``/proc``.

A run: connect the subscribers; connect the publishers; publisher 0 sends
probe messages until every subscriber has seen one (so everyone is attached
before anything is counted); then data for the warm-up plus the measured
window; then the publishers stop and the subscribers drain. Loss is what a
subscriber that was connected from the start did not receive by the end.

Flood mode is closed-loop: publishers stay at most ``--window`` messages ahead
of the slowest stream subscriber, so the server runs at its maximum without
slow-consumer policies kicking in. In flood mode, latency is sampled from the
last whole message of each chunk read (a subset); at a fixed rate every
message is parsed (latency and sequence of each).

Channels: with ``--channels N``, subscriber j and publisher i are on channel
j % N and i % N. Against the gateway, subscribers and publishers are then
JSON-lines clients of a ``format = "json"`` tcp/tls listener: ``--subscribe
'ch.{i}'`` makes each subscriber send a ``subscribe`` request (and wait for its
answer), ``--publish-to 'ch.{i}'`` makes each publisher send its messages as
``message`` envelopes to its channel, and ``--unsubscribe main`` has them all
leave the listener's channel first. Against nats-server, ``--subject 'ch.{i}'``.
Each channel is probed until all its subscribers are attached, each subscriber
expects its channel's messages only (more counts as duplicated; another
channel's message as foreign, when every message is parsed), and a flooding
publisher stays within ``--window`` of the slowest subscriber of its channel.
``--wildcard URL`` adds a JSON-lines subscriber to ``>``, which expects every
message.

The generator pins itself to one CPU (the last one by default) so that the
server can have the other; it is one process with an epoll loop, or, with
``--procs``, several such processes sharing the subscribers.
"""

from __future__ import annotations

import argparse
import json
import sys

from gateway.bench.options import Options, add_arguments
from gateway.bench.report import describe
from gateway.bench.runner import Bench
from gateway.bench.target import BenchError

__all__ = ["add_arguments", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run ``gateway bench`` with parsed arguments; returns the exit status."""
    try:
        options = Options.from_args(args)
        result = Bench(options).run()
    except BenchError as e:
        sys.stderr.write(f"gateway bench: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    if options.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        sys.stdout.write(describe(result) + "\n")
    return 0 if result["ok"] else 1
