"""Autobahn's broadcast example design, as a comparison for ``gateway bench``.

WebSocket clients register on open; every line a TCP publisher sends is
broadcast with one ``sendMessage`` per client (the loop of Autobahn's
``broadcast`` example). Usage: ``python -m tests.perf.autobahn_server TCP_PORT WS_PORT``.
"""

from __future__ import annotations

import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class BroadcastServerProtocol(WebSocketServerProtocol):
    def onOpen(self) -> None:
        self.factory.register(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.broadcast(payload, isBinary)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.factory.unregister(self)


class BroadcastServerFactory(WebSocketServerFactory):
    protocol = BroadcastServerProtocol

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.clients: list[BroadcastServerProtocol] = []

    def register(self, client: BroadcastServerProtocol) -> None:
        if client not in self.clients:
            self.clients.append(client)

    def unregister(self, client: BroadcastServerProtocol) -> None:
        if client in self.clients:
            self.clients.remove(client)

    def broadcast(self, payload: bytes, is_binary: bool = False) -> None:
        for client in self.clients:
            client.sendMessage(payload, is_binary)


class LinePublisher(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, websockets: BroadcastServerFactory) -> None:
        self.websockets = websockets

    def lineReceived(self, line: bytes) -> None:
        self.websockets.broadcast(line)


class LineFactory(Factory):
    def __init__(self, websockets: BroadcastServerFactory) -> None:
        self.websockets = websockets

    def buildProtocol(self, addr: object) -> LinePublisher:
        return LinePublisher(self.websockets)


def main() -> None:
    reactor: Any = _reactor
    tcp_port, ws_port = int(sys.argv[1]), int(sys.argv[2])
    websockets = BroadcastServerFactory(f"ws://127.0.0.1:{ws_port}")
    websockets.setProtocolOptions(perMessageCompressionAccept=lambda offers: None)
    reactor.listenTCP(ws_port, websockets, backlog=4096, interface="127.0.0.1")
    reactor.listenTCP(tcp_port, LineFactory(websockets), interface="127.0.0.1")
    print(f"listening tcp 127.0.0.1:{tcp_port} ws 127.0.0.1:{ws_port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
