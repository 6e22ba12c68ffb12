"""What comes from the other nodes: publications on Redis, checked, decoded, handed to the bus."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgpack
from twisted.logger import Logger

from gateway.cluster.interest import Interest
from gateway.cluster.wire import EVENT_NAMES, MESSAGE, WireError, decode, remote_origin
from gateway.core.bus import Bus
from gateway.core.message import Batch

if TYPE_CHECKING:
    from gateway.cluster.archive import RedisArchive


class Inbox:
    """Takes each publication once (``Interest.take``), skips this node's own, and
    delivers batches and presence of other nodes to the bus."""

    log = Logger()

    def __init__(self, bus: Bus, node: str, interest: Interest) -> None:
        self.bus = bus
        self.node = node
        self.interest = interest
        # Every frame starts with an array header, the version and the type (one
        # byte each), then the node id: this is how ours looks there.
        self.own_mark: bytes = msgpack.packb(node)
        self.batches = 0
        self.messages = 0
        self.malformed = 0  # publications on our prefix that were not frames we read
        # ``[history] store = "redis"``: numbered batches, and answers on our own channel.
        self.archive: RedisArchive | None = None
        self._private = f"{interest.prefix}:~".encode()  # nodes' own channels

    def received(self, channel: bytes, data: bytes, pattern: bytes | None = None) -> None:
        if channel.startswith(self._private):
            # A node's own channel (no gateway channel name has a "~"): ours, once.
            archive = self.archive
            if archive is not None and pattern is None and channel == archive.own_key:
                archive.own(data)
            return
        if not self.interest.take(channel, pattern):
            return  # another copy of it (an overlapping subscription) is taken instead
        if data.startswith(b"#"):
            if self.archive is None or not self.archive.numbered(data, channel):
                self._malformed(channel, "a numbered batch this node cannot read")
            return
        self._received(channel, data)

    def _received(self, channel: bytes, data: bytes) -> None:
        if data.startswith(self.own_mark, 3):
            return  # our own publication (Redis sends them back to us): not even decoded
        try:
            frame = decode(data)
        except WireError as e:
            self._malformed(channel, str(e))
            return
        if frame.node == self.node:
            return  # our own publication
        if channel != self.interest.key(frame.channel):
            # Another cluster whose prefix starts with ours and a colon.
            return
        try:
            if frame.type == MESSAGE:
                self.batches += 1
                self.messages += len(frame.payloads)
                self.bus.publish_remote(
                    Batch(
                        remote_origin(frame),
                        frame.channel,
                        frame.payloads,
                        frame.kinds,
                        frame.lines,
                    )
                )
            else:
                self.bus.announce_remote(
                    EVENT_NAMES[frame.type], remote_origin(frame), frame.channel
                )
        except Exception:
            self.log.failure("delivering a batch from node {node} failed", node=frame.node)

    def _malformed(self, channel: bytes, problem: str) -> None:
        self.malformed += 1
        if self.malformed == 1 or self.malformed % 1000 == 0:
            self.log.warn(
                "backplane: ignored {count} publication(s) on {channel} that are not gateway "
                "frames ({problem}); is another program using the prefix?",
                count=self.malformed,
                channel=channel.decode("utf-8", "replace"),
                problem=problem,
            )
