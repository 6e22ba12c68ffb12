"""Datagram peers (the ``udp`` listener).

Each datagram is one message (one trailing ``\\n`` or ``\\r\\n`` removed). A
source address becomes a peer on its first datagram and stays one until
``peer_timeout`` seconds pass without a datagram from it. Messages go out one
datagram each, payload followed by ``\\n``; a message too large for one
datagram is dropped for UDP receivers and counted, never truncated.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from gateway.address import host_port
from gateway.bus import Bus
from gateway.config import MAX_UDP_PAYLOAD, DatagramListenerConfig, Limits
from gateway.interfaces import IFramer, IPeer
from gateway.message import Batch, Origin

Address = tuple[str, int]
Datagrams = tuple[list[bytes], int]


@implementer(IFramer)
class DatagramFramer:
    """One datagram per payload, plus the number dropped for being too large."""

    name = "datagram"

    def frame(self, batch: Batch) -> Datagrams | None:
        datagrams = [payload + b"\n" for payload in batch.payloads]
        if max(map(len, datagrams)) <= MAX_UDP_PAYLOAD:
            return datagrams, 0
        fitting = [d for d in datagrams if len(d) <= MAX_UDP_PAYLOAD]
        return fitting, len(datagrams) - len(fitting)


DATAGRAM_FRAMER = DatagramFramer()


@implementer(IPeer)
class DatagramPeer:
    """A source address that has sent to a UDP listener recently."""

    framer = DATAGRAM_FRAMER

    def __init__(self, listener: DatagramListener, address: Address, peer_id: str) -> None:
        self.listener = listener
        self.remote = address
        self.address = host_port(address[0], address[1])
        self.origin = Origin(peer_id, listener.config.name, "udp")
        self.channel = listener.config.channel
        self.echo = listener.config.echo
        self.expiry: IDelayedCall | None = None

    def deliver(self, wire: Datagrams) -> None:
        datagrams, too_large = wire
        if too_large:
            self.listener.bus.metrics.drop("udp_too_large", too_large)
        write = self.listener.write
        for datagram in datagrams:
            write(datagram, self.remote)

    def close(self, reason: str) -> None:
        self.listener.forget(self, reason)


class DatagramListener(DatagramProtocol):
    """The peers of one UDP port, keyed by source address."""

    log = Logger()
    noisy = False

    def __init__(
        self, bus: Bus, config: DatagramListenerConfig, limits: Limits, clock: IReactorTime
    ) -> None:
        self.bus = bus
        self.config = config
        self.clock = clock
        self.max_message_bytes = min(limits.max_message_bytes, MAX_UDP_PAYLOAD)
        self.peers: dict[Address, DatagramPeer] = {}

    @property
    def read_size(self) -> int:
        """Bytes to read per datagram: enough to see that one is too large."""
        return self.max_message_bytes + 3

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        address: Address = (addr[0], addr[1])
        if datagram.endswith(b"\n"):
            datagram = datagram[:-2] if datagram.endswith(b"\r\n") else datagram[:-1]
        if len(datagram) > self.max_message_bytes:
            self.bus.metrics.drop("oversize")
            self.log.debug(
                "dropped a datagram of over {limit} bytes from {address}",
                limit=self.max_message_bytes,
                address=host_port(*address),
            )
            return
        peer = self.peers.get(address)
        if peer is None:
            peer = self._new_peer(address)
            if peer is None:
                return
        else:
            assert peer.expiry is not None
            peer.expiry.reset(self.config.peer_timeout)
        if datagram:
            self.bus.publish(peer, Batch(peer.origin, peer.channel, [datagram]))

    def _new_peer(self, address: Address) -> DatagramPeer | None:
        if len(self.peers) >= self.config.max_peers:
            self.bus.metrics.drop("udp_max_peers")
            return None
        peer = DatagramPeer(self, address, self.bus.new_peer_id(self.config.name))
        peer.expiry = self.clock.callLater(self.config.peer_timeout, self.forget, peer, "timed out")
        self.peers[address] = peer
        count = self.bus.attach(peer)
        self.log.info(
            '{peer} joined from {address} (listener "{listener}", {count} peers)',
            peer=peer.origin.peer_id,
            address=peer.address,
            listener=self.config.name,
            count=count,
        )
        return peer

    def forget(self, peer: DatagramPeer, reason: str) -> None:
        """Detach ``peer`` (timed out, or the gateway is stopping)."""
        if self.peers.get(peer.remote) is not peer:
            return
        del self.peers[peer.remote]
        if peer.expiry is not None and peer.expiry.active():
            peer.expiry.cancel()
        self.bus.detach(peer)
        self.log.info("{peer} left ({reason})", peer=peer.origin.peer_id, reason=reason)

    def write(self, datagram: bytes, address: Address) -> None:
        """Send one datagram; a full socket buffer drops it, counted."""
        assert self.transport is not None
        try:
            self.transport.write(datagram, address)
        except (OSError, MessageLengthError):
            self.bus.metrics.drop("udp_send_error")

    def stopProtocol(self) -> None:
        for peer in list(self.peers.values()):
            self.forget(peer, "gateway stopping")
