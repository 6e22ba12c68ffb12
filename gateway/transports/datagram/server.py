"""Datagram peers (the ``udp`` listener).

Each datagram is one message (one trailing ``\\n`` or ``\\r\\n`` removed). A
source address becomes a peer on its first datagram and stays one until
``peer_timeout`` seconds pass without a datagram from it. Messages go out one
datagram each, payload followed by ``\\n``; a message too large for one
datagram is dropped for UDP receivers and counted, never truncated.

UDP source addresses can be forged, so learning peers from datagrams would make
the listener a reflector. Two defences, per listener:

- ``allow``: datagrams from sources outside these networks are ignored.
- ``challenge``: a new source becomes a peer only once it echoes a cookie the
  gateway sent it (a return-routability check, like SYN cookies: the cookie is
  a keyed hash of the source address and a time window, so unverified sources
  cost no memory). Until then the gateway never sends a source more bytes than
  it received from it.

Control datagrams start with ``CONTROL_PREFIX``; they are never relayed. See
docs/protocol.md for the exact format.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, ISystemHandle
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from gateway.auth.roles import Permissions
from gateway.config.listeners import MAX_UDP_PAYLOAD, UdpListenerConfig
from gateway.config.settings import Limits
from gateway.core.interfaces import IFramer, IPeer
from gateway.core.message import Batch, Origin
from gateway.dtls.cookies import Cookies
from gateway.flow.caps import TokenBucket
from gateway.flow.ratelog import RateLimitedLog
from gateway.transports.address import host_port
from gateway.transports.datagram.framing import DATAGRAM_FRAMER, JSON_DATAGRAM_FRAMER, Datagrams
from gateway.transports.datagram.wire import (
    CHALLENGE_SIZE,
    CONTROL_PREFIX,
    challenge,
    parse_control,
)
from gateway.transports.listening import ListenerService, listen_shared_datagram
from gateway.transports.runtime import GatewayContext, ListenerRuntime, tell
from gateway.transports.sessions import JsonSession

Address = tuple[str, int]
"""The datagrams to send, and how many messages were too large or reserved to send."""
IPAddress = IPv4Address | IPv6Address


_READ_AT_LEAST = 128
"""Datagrams are read at least this far, so control datagrams are seen whole."""

_LOOPBACK_V4 = IPv4Network("127.0.0.0/8")
_LOOPBACK_V6 = (IPv6Network("::1/128"), IPv6Network("::ffff:127.0.0.0/104"))


def is_loopback(network: IPv4Network | IPv6Network) -> bool:
    """Whether every address of ``network`` is a loopback address."""
    if isinstance(network, IPv4Network):
        return network.subnet_of(_LOOPBACK_V4)
    return any(network.subnet_of(loopback) for loopback in _LOOPBACK_V6)


WELCOME_PEERS = 20
"""A JSON welcome over UDP lists at most this many peers: it must fit one datagram."""


@implementer(IPeer)
class DatagramPeer:
    """A source address that has sent to a UDP listener recently."""

    framer: IFramer = DATAGRAM_FRAMER
    subject: str | None = None
    pending_bytes = 0  # every datagram goes out at once, or is dropped
    dropped_messages = 0
    refused_at = float("-inf")
    quiet = False

    def __init__(
        self, server: DatagramServer, address: Address, origin: Origin | None = None
    ) -> None:
        self.server = server
        self.remote = address
        self.address = host_port(address[0], address[1])
        config = server.runtime.config
        self.origin = origin or server.runtime.new_origin("udp")
        self.channel = config.channel
        self.echo = config.echo
        self.expiry: IDelayedCall | None = None
        rate = server.max_messages_per_second
        self.bucket = TokenBucket(rate, server.runtime.clock) if rate > 0 else None
        # JSON clients (``format = "json"``): their requests and presence.
        self.session: JsonSession | None = None
        if server.config.format == "json":
            self.framer = JSON_DATAGRAM_FRAMER
            self.session = JsonSession(
                self,
                server.bus,
                server.runtime.context.relays,
                WELCOME_PEERS,
                server.runtime.config.presence,
            )

    def deliver(self, wire: Datagrams) -> None:
        datagrams, too_large, reserved = wire
        if too_large:
            self.server.bus.metrics.drop("udp_too_large", too_large)
        if reserved:
            self.server.bus.metrics.drop("udp_reserved", reserved)
        self.send(datagrams)

    def send(self, datagrams: list[bytes]) -> None:
        """Send each message (with its ``\n``) as one datagram."""
        write = self.server.write
        for datagram in datagrams:
            write(datagram, self.remote)

    @property
    def permissions(self) -> Permissions | None:
        return self.server.runtime.permissions

    def forbidden(self, action: str, channel: str) -> None:
        self.server.runtime.forbidden(self, self.session, action, channel)

    def close(self, reason: str) -> None:
        self.server.forget(self, reason)


class DatagramServer(DatagramProtocol):
    """The peers of one UDP port, keyed by source address."""

    log = Logger()
    noisy = False

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.bus = runtime.bus
        self.clock = runtime.clock
        self.config = _udp(runtime)
        limits = runtime.limits
        self.max_message_bytes = min(limits.max_message_bytes, MAX_UDP_PAYLOAD)
        self.max_messages_per_second = limits.max_messages_per_second
        self.peers: dict[Address, DatagramPeer] = {}
        self.warnings = RateLimitedLog(self.log, self.clock)
        # Per listener and per run: cookies from before a restart are worthless.
        self.cookies = Cookies(self.clock)
        # Bytes to read per datagram: enough to see that one is too large. Fixed
        # when the port opens, so a reload cannot raise the limit beyond it.
        self.read_size = max(self.max_message_bytes + 3, _READ_AT_LEAST)

    def reconfigure(self) -> None:
        """Apply reloaded settings: allow list, challenge, timeouts, caps and limits."""
        self.config = _udp(self.runtime)
        limits = self.runtime.limits
        self.max_message_bytes = min(limits.max_message_bytes, MAX_UDP_PAYLOAD, self.read_size - 3)
        self.max_messages_per_second = limits.max_messages_per_second

    # The socket's own sendto, once listening: peers' addresses are already
    # checked tuples, so Twisted's per-datagram address validation is skipped.
    _sendto: Any = None

    def startProtocol(self) -> None:
        transport: Any = self.transport
        if ISystemHandle.providedBy(transport):
            handle: Any = transport.getHandle()
            self._sendto = handle.sendto
        wide = [str(n) for n in self.config.allow if not is_loopback(n)]
        if wide and not self.config.challenge:
            self.log.warn(
                'UDP listener "{listener}" accepts sources beyond loopback ({networks}) '
                "with challenge = false: anyone who can forge a source address there can "
                "make it a reflector that sends bus traffic to a victim; set challenge = true",
                listener=self.config.name,
                networks=", ".join(wide),
            )

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        address: Address = (addr[0], addr[1])
        peer = self.peers.get(address)
        if peer is None:
            self._from_stranger(message_of(datagram), len(datagram), address)
        else:
            self.received(peer, datagram)

    def received(self, peer: DatagramPeer, message: bytes) -> None:
        """One message (a datagram, or a DTLS record) from ``peer``: relayed, unless it is
        empty or a control datagram (which only keep the peer alive) or too long."""
        message = message_of(message)
        assert peer.expiry is not None
        if not message or message.startswith(CONTROL_PREFIX):
            peer.expiry.reset(self.config.peer_timeout)
            return
        if len(message) > self.max_message_bytes:
            self._oversize(peer.remote)
            return
        peer.expiry.reset(self.config.peer_timeout)
        self._relay(peer, message)

    def _relay(self, peer: DatagramPeer, datagram: bytes) -> None:
        if peer.bucket is not None and not peer.bucket.has(1):
            self.bus.metrics.drop("rate_limit")
            self.warnings.emit(
                "rate_limit",
                '{peer} on UDP listener "{listener}" sends over {rate:g} messages/s: dropping',
                peer=peer.origin.peer_id,
                listener=self.config.name,
                rate=self.max_messages_per_second,
            )
            return
        if peer.session is None:
            self.bus.publish(peer, Batch(peer.origin, peer.channel, [datagram]))
            return
        request = peer.session.handle(datagram)
        if request is not None:
            channel, payload, kind = request
            kinds = None if kind is None else (kind,)
            self.bus.publish(peer, Batch(peer.origin, channel, [payload], kinds))

    def _from_stranger(self, datagram: bytes, received: int, address: Address) -> None:
        """A datagram from a source that is not a peer (yet)."""
        ip = self._allowed_ip(address[0])
        if ip is None:
            self._ignore("udp_not_allowed", address, "its source is not in the allow list")
            return
        control = parse_control(datagram)
        if control is None and len(datagram) > self.max_message_bytes:
            self._oversize(address)
            return
        if not self.config.challenge:
            peer = self._new_peer(address)
            if peer is not None and datagram and control is None:
                self._relay(peer, datagram)
            return
        if control is not None and control[0] == b"response":
            if self._cookie_valid(control[1], address):
                self._new_peer(address)
                return
            self._ignore("udp_bad_cookie", address, "a wrong or expired cookie")
        elif control is None and datagram:
            self._ignore("udp_unverified", address, "a message from an unverified source")
        elif received < CHALLENGE_SIZE:
            self._ignore(
                "udp_challenge_short",
                address,
                f"shorter than a challenge ({CHALLENGE_SIZE} bytes), so not answered",
            )
        if received >= CHALLENGE_SIZE:
            self.write(challenge(self.cookies.make(address)), address)

    def _allowed_ip(self, host: str) -> IPAddress | None:
        """The source's IP (IPv4-mapped IPv6 as IPv4) when ``allow`` admits it."""
        try:
            ip = ip_address(host)
        except ValueError:
            return None
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip if any(ip in network for network in self.config.allow) else None

    def _cookie_valid(self, cookie_hex: bytes, address: Address) -> bool:
        try:
            cookie = bytes.fromhex(cookie_hex.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return False
        return self.cookies.valid(address, cookie)

    def _ignore(self, cause: str, address: Address, why: str) -> None:
        self.bus.metrics.drop(cause)
        self.warnings.emit(
            cause,
            'UDP listener "{listener}" ignored a datagram from {address}: {why}',
            listener=self.config.name,
            address=host_port(*address),
            why=why,
        )

    def _oversize(self, address: Address) -> None:
        self.bus.metrics.drop("oversize")
        self.warnings.emit(
            "oversize",
            'UDP listener "{listener}" dropped a datagram of over {limit} bytes from {address}',
            listener=self.config.name,
            limit=self.max_message_bytes,
            address=host_port(*address),
        )

    def _new_peer(self, address: Address) -> DatagramPeer | None:
        if len(self.peers) >= self.config.max_peers:
            self._ignore("udp_max_peers", address, f"max_peers ({self.config.max_peers}) reached")
            return None
        return self.join(DatagramPeer(self, address))

    def join(self, peer: DatagramPeer) -> DatagramPeer:
        """Put ``peer`` on the bus: its expiry, the log line, welcome, history."""
        address = peer.remote
        peer.expiry = self.clock.callLater(self.config.peer_timeout, self.forget, peer, "timed out")
        self.peers[address] = peer
        count = self.runtime.attach(peer, verb="joined")
        if peer.session is not None:
            peer.session.join(count)
            return peer
        text = self.runtime.welcome_text(count, peer.origin)  # dtls listeners have one
        if text is not None:
            tell(peer, text, peer.channel)
        self.bus.replay_history(peer)
        return peer

    def forget(self, peer: DatagramPeer, reason: str) -> None:
        """Detach ``peer`` (timed out, or the gateway is stopping)."""
        if self.peers.get(peer.remote) is not peer:
            return
        del self.peers[peer.remote]
        if peer.expiry is not None and peer.expiry.active():
            peer.expiry.cancel()
        if peer.session is not None:
            peer.session.stop()
        self.bus.detach(peer)
        self.runtime.gone(peer.origin.peer_id, reason, verb="left")

    def write(self, datagram: bytes, address: Address) -> None:
        """Send one datagram; a full socket buffer drops it, counted."""
        try:
            if self._sendto is not None:
                self._sendto(datagram, address)
            else:
                assert self.transport is not None
                self.transport.write(datagram, address)
        except (OSError, MessageLengthError):
            self.bus.metrics.drop("udp_send_error")

    def stopProtocol(self) -> None:
        for peer in list(self.peers.values()):
            self.forget(peer, "gateway stopping")


def message_of(datagram: bytes) -> bytes:
    """A datagram's message: one trailing ``\n`` or ``\r\n`` removed."""
    if datagram.endswith(b"\n"):
        return datagram[:-2] if datagram.endswith(b"\r\n") else datagram[:-1]
    return datagram


def _udp(runtime: ListenerRuntime) -> UdpListenerConfig:
    config = runtime.config
    assert isinstance(config, UdpListenerConfig)
    return config


class DatagramListener(ListenerService):
    """A ``udp`` listener."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        super().__init__(runtime)
        self.server = self.make_server()

    def make_server(self) -> DatagramServer:
        return DatagramServer(runtime=self.runtime)

    async def open(self, reactor: Any) -> IListeningPort:
        config = self.config
        server = self.server
        if self.reuse_port:
            return listen_shared_datagram(reactor, config, server, server.read_size)
        port: IListeningPort = reactor.listenUDP(
            config.port, server, interface=config.host, maxPacketSize=server.read_size
        )
        return port

    def configure(self) -> None:
        self.server.reconfigure()

    def peer_count(self) -> int:
        return len(self.server.peers)


def build(config: UdpListenerConfig, limits: Limits, context: GatewayContext) -> DatagramListener:
    return DatagramListener(ListenerRuntime(config, limits, context))
