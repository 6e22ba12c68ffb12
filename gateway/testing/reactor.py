"""The memory reactor of ``MemoryGateway`` (with UDP ports), its log capture, and a fake cluster backplane."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

from gateway.core.bus import Bus
from gateway.core.message import Batch, Origin


class MemoryDatagramPort:
    """What ``listenUDP`` returns on the memory reactor: records what the protocol sends."""

    def __init__(self, protocol: DatagramProtocol, interface: str, port: int) -> None:
        self.protocol = protocol
        family = IPv6Address if ":" in interface else IPv4Address
        self.address = family("UDP", interface or "0.0.0.0", port)
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.written.append((datagram, (address[0], address[1])))

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address

    def stopListening(self) -> None:
        self.protocol.doStop()


class GatewayReactor(MemoryReactorClock):
    """``MemoryReactorClock`` with the UDP ports a gateway needs."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.udp_ports: list[MemoryDatagramPort] = []

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> MemoryDatagramPort:
        udp = MemoryDatagramPort(protocol, interface, port)
        self.udp_ports.append(udp)
        protocol.makeConnection(udp)  # type: ignore[arg-type]
        return udp


@implementer(ILogObserver)
class LogCapture:
    def __init__(self, limit: int = 100_000) -> None:
        self.events: list[LogEvent] = []
        self.limit = limit

    def __call__(self, event: LogEvent) -> None:
        if len(self.events) < self.limit:
            self.events.append(event)


class FakeBackplane:
    """Stands in for the cluster backplane: records what the bus forwards, and plays
    batches and presence "from other nodes" into it."""

    def __init__(self, bus: Bus, flush: Callable[[], None] = lambda: None) -> None:
        self.bus = bus
        self.flush = flush  # moves what remote messages made (MemoryGateway.flush)
        self.forwarded: list[Batch] = []
        self.presence_events: list[tuple[str, str, str]] = []
        # What the node would listen to on Redis: ("subscribe" | "unsubscribe", name or pattern).
        self.interest: list[tuple[str, str]] = []
        bus.backplane = self

    def forward(self, batch: Batch) -> None:
        self.forwarded.append(batch)

    def presence(self, event: str, origin: Origin, channel: str) -> None:
        self.presence_events.append((event, origin.peer_id, channel))

    def subscribed(self, subscription: str) -> None:
        self.interest.append(("subscribe", subscription))

    def unsubscribed(self, subscription: str) -> None:
        self.interest.append(("unsubscribe", subscription))

    def remote_message(
        self, payload: bytes, channel: str = "main", peer: str = "remote-1", node: str = "other"
    ) -> int:
        """A message from a peer of another node; returns the local receivers reached."""
        origin = Origin(peer, node, "remote")
        reached = self.bus.publish_remote(Batch(origin, channel, [payload]))
        self.flush()
        return reached
