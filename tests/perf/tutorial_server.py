"""The classic Twisted chat-server tutorial design, as a comparison for ``gateway bench``.

A ``LineReceiver`` per client, a factory-level list of clients, and one
``sendLine`` per receiver per line. Usage: ``python -m tests.perf.tutorial_server PORT``.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class Broadcast(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, clients: list[Broadcast]) -> None:
        self.clients = clients

    def connectionMade(self) -> None:
        self.clients.append(self)

    def connectionLost(self, reason: object = None) -> None:
        self.clients.remove(self)

    def lineReceived(self, line: bytes) -> None:
        for client in self.clients:
            if client is not self:
                client.sendLine(line)


class BroadcastFactory(Factory):
    def __init__(self) -> None:
        self.clients: list[Broadcast] = []

    def buildProtocol(self, addr: object) -> Broadcast:
        return Broadcast(self.clients)


def main() -> None:
    reactor: Any = _reactor
    port = int(sys.argv[1])
    reactor.listenTCP(port, BroadcastFactory(), backlog=4096, interface="127.0.0.1")
    print(f"listening tcp 127.0.0.1:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
