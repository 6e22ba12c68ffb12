"""Join and leave events for the JSON clients of one listener."""

from __future__ import annotations

from twisted.logger import Logger

from gateway.core.bus import Bus, RemotePeer
from gateway.core.interfaces import IPeer
from gateway.transports.websocket.envelope import json_event


class PresenceRelay:
    """Tells the JSON clients of one listener who joins and leaves their channel.

    One bus watcher per listener: each event is framed once and written to
    every JSON client, like a batch.
    """

    log = Logger()

    def __init__(self, bus: Bus, channel: str) -> None:
        self.bus = bus
        self.channel = channel
        self.clients: dict[IPeer, None] = {}

    def add(self, client: IPeer) -> None:
        if not self.clients:
            self.bus.watch_presence(self.channel, self.announce)
        self.clients[client] = None

    def discard(self, client: IPeer) -> None:
        if client in self.clients:
            del self.clients[client]
            if not self.clients:
                self.bus.unwatch_presence(self.channel, self.announce)

    def announce(self, event: str, peer: IPeer | RemotePeer, count: int) -> None:
        wire = json_event(
            {
                "type": event,
                "peer": peer.origin.peer_id,
                "transport": peer.origin.transport,
                "count": count,
            }
        )
        for client in tuple(self.clients):
            if client is peer:
                continue
            try:
                client.deliver(wire)
            except Exception:
                self.log.failure("presence event to {peer} failed", peer=client.origin.peer_id)
                client.close("delivery failed")
