"""JSON clients on any transport: their requests, and join/leave events for them.

A ``JsonSession`` belongs to one JSON client (a WebSocket on ``gateway.v1.json``,
a ``tcp``/``tls``/``udp`` peer of a ``format = "json"`` listener): it answers
``subscribe``/``unsubscribe`` requests, turns ``message`` requests into what
to publish, and keeps the client in the presence of every channel name it is
subscribed to. ``PresenceRelays`` frames each join or leave once per kind of
client. Each transport's JSON framer adds ``event(fields)``: the wire form of
one event.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from twisted.logger import Logger

from gateway.core.archive import Recall, recall
from gateway.core.bus import Bus, SubscriptionError
from gateway.core.channels import has_wildcard
from gateway.core.history import deliver_all
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Kind
from gateway.core.presence import RemotePeer
from gateway.transports.envelopes import Request, RequestError, parse_request, plain_message
from gateway.transports.signin import Attempt, parse_attempt

MAX_WELCOME_PEERS = 1000
"""At most this many entries in the ``peers`` list of a JSON welcome."""

Publish = tuple[str, bytes, Kind | None]
"""What a client sent to publish: (channel, payload, kind or None for untyped bytes)."""


class EventFramer(Protocol):
    """A JSON client's framer: batches as ``message`` events, and single events."""

    def event(self, fields: dict[str, Any]) -> Any:
        """The wire form of one event (``welcome``, ``join``, ``error``, ...)."""


def _event(peer: IPeer, fields: dict[str, Any]) -> Any:
    framer: Any = peer.framer
    return framer.event(fields)


class PresenceRelays:
    """JSON clients by the channel names they are subscribed to; one bus watcher per name."""

    log = Logger()

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._clients: dict[str, dict[IPeer, None]] = {}
        self._watchers: dict[str, Any] = {}
        self._channels: dict[IPeer, list[str]] = {}

    def add(self, client: IPeer, channel: str) -> None:
        clients = self._clients.get(channel)
        if clients is None:
            clients = self._clients[channel] = {}
            watcher = self._watchers[channel] = self._announcer(channel)
            self.bus.watch_presence(channel, watcher)
        if client not in clients:
            clients[client] = None
            self._channels.setdefault(client, []).append(channel)

    def discard(self, client: IPeer, channel: str) -> None:
        clients = self._clients.get(channel)
        if clients is None or client not in clients:
            return
        del clients[client]
        channels = self._channels[client]
        channels.remove(channel)
        if not channels:
            del self._channels[client]
        if not clients:
            del self._clients[channel]
            self.bus.unwatch_presence(channel, self._watchers.pop(channel))

    def discard_all(self, client: IPeer) -> None:
        for channel in list(self._channels.get(client, ())):
            self.discard(client, channel)

    def _announcer(self, channel: str) -> Any:
        def announce(event: str, peer: IPeer | RemotePeer, count: int) -> None:
            fields = {
                "type": event,
                "peer": peer.origin.peer_id,
                "transport": peer.origin.transport,
                "channel": channel,
                "count": count,
            }
            wires: dict[IFramer, Any] = {}  # framed once per kind of client
            for client in tuple(self._clients.get(channel, ())):
                if client is peer:
                    continue
                wire = wires.get(client.framer)
                if wire is None:
                    wire = wires[client.framer] = _event(client, fields)
                try:
                    client.deliver(wire)
                except Exception:
                    self.log.failure("presence event to {peer} failed", peer=client.origin.peer_id)
                    client.close("delivery failed")

        return announce


class JsonSession:
    """The requests and presence of one JSON client."""

    __slots__ = ("bus", "on_auth", "peer", "presence", "relays", "welcome_peers")

    def __init__(
        self,
        peer: IPeer,
        bus: Bus,
        relays: PresenceRelays,
        welcome_peers: int = MAX_WELCOME_PEERS,
        presence: bool = True,
    ) -> None:
        self.peer = peer
        self.bus = bus
        self.relays = relays
        # How many peers the welcome lists at most (few over UDP: one datagram).
        self.welcome_peers = welcome_peers
        # False (the listener's ``presence = false``): no peer lists, no join/leave events.
        self.presence = presence
        # A later ``auth`` request (extending a JWT session); None: signing in is not for here.
        self.on_auth: Callable[[Attempt], None] | None = None

    def join(self, count: int, since: tuple[int, str] | None = None) -> None:
        """The welcome, then the peer's channel's history: its last messages, or with
        ``since`` (the offset and epoch a WebSocket URL gave) the messages after it,
        recovered, when they are all kept (the welcome says whether they are). The
        peer's subscription to its channel begins with the welcome (with a cluster's
        history store: once it answered)."""
        peer = self.peer

        def joined(found: Recall) -> None:
            self.welcome(count, found)
            deliver_all(peer, found.batches)

        recall(self.bus, peer, peer.channel, since, joined, start=True)

    def welcome(self, count: int, found: Recall) -> None:
        """Send the ``welcome`` event, and start hearing about the peer's channel (unless
        its permissions kept it from subscribing to it: then it hears of nobody there)."""
        peer = self.peer
        fields: dict[str, Any] = {"type": "welcome", "peer": peer.origin.peer_id}
        if peer.origin.user is not None:
            fields["user"] = peer.origin.user
        fields["count"] = count
        fields["channel"] = peer.channel
        joined = peer.channel in self.bus.subscriptions(peer)
        if joined:
            fields.update(_position(found))
        if found.recovered is not None:
            fields["recovered"] = found.recovered
        if not self.presence:
            self.send({**fields, "presence": False})
            return
        peers = self.bus.peers(peer.channel) if joined else []
        fields["peers"] = [
            {"peer": other.origin.peer_id, "transport": other.origin.transport}
            for other in peers[: self.welcome_peers]
        ]
        fields["channel_count"] = len(peers)
        self.send(fields)
        if joined:
            self.relays.add(peer, peer.channel)

    def stop(self) -> None:
        """The client is going: no more events for it."""
        self.relays.discard_all(self.peer)

    def handle(self, data: bytes) -> Publish | None:
        """A message from the client: a request answered here, or what to publish."""
        plain = plain_message(data)
        if plain is not None:
            return plain[0], plain[1], Kind.TEXT
        attempt = parse_attempt(data, json_client=True)
        if attempt is not None:
            if self.on_auth is None:
                self.send({"type": "error", "code": "auth_failed", "reason": "cannot sign in here"})
            else:
                self.on_auth(attempt)
            return None
        try:
            request = parse_request(data)
        except RequestError as e:
            self.send(e.event)
            return None
        peer = self.peer
        if request is None:
            return peer.channel, data, None
        if request.type == "message":
            channel = request.channel or peer.channel
            permissions = peer.permissions
            if permissions is not None and not permissions.may_publish(channel):
                # Refused here rather than by the bus: the error carries the request's id.
                self.bus.metrics.deny("publish")
                self.bus.metrics.drop("forbidden")
                self.send(request.answer(**_refusal("publish", channel)))
                return None
            return channel, request.payload, request.kind
        pattern = request.channel
        assert pattern is not None
        try:
            if request.type == "unsubscribe":
                self.bus.unsubscribe(peer, pattern)
            elif has_wildcard(pattern):
                self.bus.subscribe(peer, pattern)
            else:
                recall(self.bus, peer, pattern, request.since, partial(self._subscribed, request))
                return None
        except SubscriptionError as e:
            self.send(request.answer(type="error", code=e.code, reason=e.reason))
            return None
        if request.type == "subscribe":
            self.send(request.answer(type="subscribed", channel=pattern))
        else:
            self.relays.discard(peer, pattern)
            self.send(request.answer(type="unsubscribed", channel=pattern))
        return None

    def _subscribed(self, request: Request, found: Recall) -> None:
        """A subscribe to a channel name, now that what the peer is owed there is known.

        Without ``since``: ``subscribed`` (the channel's position), then its last
        messages. With ``since``: the messages after it (each ``recovered``), then
        ``subscribed`` with ``"recovered":true``; or, when they are not all kept,
        ``"recovered":false`` and the last messages as a plain replay. The subscription
        takes effect in the same step: no live message comes in between."""
        peer, channel = self.peer, request.channel
        assert channel is not None
        try:
            new = self.bus.subscribe(peer, channel)
        except SubscriptionError as e:
            self.send(request.answer(type="error", code=e.code, reason=e.reason))
            return
        fields = _position(found)
        if found.recovered:
            deliver_all(peer, found.batches)
        if found.recovered is not None:
            fields["recovered"] = found.recovered
        self.send(request.answer(type="subscribed", channel=channel, **fields))
        if new and self.presence:
            self.relays.add(peer, channel)
        if found.recovered is False or (found.recovered is None and new):
            deliver_all(peer, found.batches)

    def forbidden(self, action: str, channel: str) -> None:
        """Tell the client it was refused ``action`` on ``channel`` (see ``IPeer.forbidden``)."""
        if action == "publish":
            self.send(_refusal(action, channel))
        else:
            self.relays.discard(self.peer, channel)
            self.send({"type": "unsubscribed", "channel": channel, "reason": "forbidden"})

    def send(self, fields: dict[str, Any]) -> None:
        """Send the client one event."""
        self.peer.deliver(_event(self.peer, fields))


def _position(found: Recall) -> dict[str, Any]:
    """``offset`` (the last given) and ``epoch`` of a channel name that keeps history."""
    position = found.position
    return {} if position is None else {"offset": position[0], "epoch": position[1]}


def _refusal(action: str, channel: str) -> dict[str, Any]:
    return {
        "type": "error",
        "code": "forbidden",
        "reason": f"not allowed to {action} to {channel}",
        "channel": channel,
    }
