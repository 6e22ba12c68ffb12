"""The Lua scripts of the Redis history store, and what their answers mean.

Each script runs atomically in Redis, so what it numbers, keeps and publishes is
in one order for every node (see ``gateway.cluster.archive`` and docs/history.md):

- ``SEQUENCE`` numbers one batch (``HINCRBY`` of the channel's ``last``; an
  ``epoch`` made when the channel has none), keeps each message in the channel's
  stream (``XADD ... MAXLEN ~ N``, entry id ``<offset>-0``), then publishes the
  numbered batch on the channel and an acknowledgement on the publishing node's
  own Redis channel;
- ``RECALL`` reads a channel's position and its newest kept messages and
  *publishes* them to the asking node's own Redis channel: they reach it on the
  subscribed connection in order with the channel's publications, so the node
  knows exactly which live messages came before the answer and which after;
- ``RENEW`` gives a channel a new epoch (its kept messages are let go): after
  messages went out unnumbered while Redis was unreachable, or when a reload
  stops its history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

import msgpack

from gateway.cluster.wire import decode, remote_origin
from gateway.core.archive import Recall
from gateway.core.message import Batch, Kind, Origin


def _epoch(candidate: int) -> bytes:
    """Lua: ``epoch``, the channel's; a channel without one gets ``ARGV[candidate]`` and
    starts from offset 0 with an empty stream."""
    return (
        b"""
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[%d]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'last', 0)
end
"""
        % candidate
    )


SEQUENCE = (
    _epoch(3)
    + b"""local last = redis.call('HINCRBY', KEYS[1], 'last', ARGV[8])
local first = last - tonumber(ARGV[8]) + 1
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], last .. '-0', 't', ARGV[9], 'f', ARGV[7])
if ARGV[5] ~= '0' then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
redis.call('PUBLISH', ARGV[1], '#' .. first .. ' ' .. epoch .. ' ' .. ARGV[6] .. ' ' .. ARGV[7])
redis.call('PUBLISH', ARGV[2], 'a' .. ARGV[6])
return first
"""
)
"""KEYS: position hash, stream. ARGV: the channel's Redis channel, the node's own Redis
channel, an epoch for a channel without one, MAXLEN (the channel's ``history``: at least
that many batches, so at least that many messages, are kept), PEXPIRE ms (0: none), the
node's sequence number for the batch, its backplane frame, how many messages it holds,
when it was sent. One stream entry per batch, its id the offset of its last message."""

RECALL = (
    _epoch(4)
    + b"""local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
local start = math.max(1, last - tonumber(ARGV[3]) + 1)
local entries = redis.call('XRANGE', KEYS[2], start .. '-0', '+')
redis.call('PUBLISH', ARGV[1], 'r' .. cmsgpack.pack({ARGV[2], epoch, last, entries}))
return 1
"""
)
"""KEYS: position hash, stream. ARGV: the node's own Redis channel, the request id, the
channel's ``history``, an epoch for a channel without one. Reads the batches that hold
any of the last ``history`` messages (at most one more batch than those messages)."""

RENEW = b"""
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'epoch', ARGV[1]) end
return 1
"""
"""KEYS: position hash, stream. ARGV: the new epoch. Offsets go on from ``last``."""


def sha1(script: bytes) -> bytes:
    """The name Redis knows a loaded script by (``EVALSHA``)."""
    return hashlib.sha1(script).hexdigest().encode()


class Numbered(NamedTuple):
    """A batch as ``SEQUENCE`` published it: its first offset, epoch, the publishing
    node's sequence number for it, and the backplane frame."""

    first: int
    epoch: str
    seq: int
    frame: bytes


def parse_numbered(data: bytes) -> Numbered:
    """``#<first> <epoch> <seq> <frame>``; raises ``ValueError`` for anything else."""
    head, _, rest = data.partition(b" ")
    epoch, _, rest = rest.partition(b" ")
    seq, _, frame = rest.partition(b" ")
    if not head.startswith(b"#") or not epoch or not frame:
        raise ValueError("not a numbered batch")
    return Numbered(int(head[1:]), epoch.decode("ascii"), int(seq), frame)


Kept = tuple[int, Origin, Kind | None, bytes, float]
"""One kept message: offset, sender, kind (None: untyped), payload, when it was sent."""


class Recalled(NamedTuple):
    """A ``RECALL`` answer: the request it answers, the channel's epoch and last offset,
    and its newest kept messages, oldest first."""

    request: int
    epoch: str
    last: int
    kept: list[Kept]


def parse_recalled(data: bytes, node: str) -> Recalled:
    """``r`` + msgpack ``[request, epoch, last, [[id, [field, value, ...]], ...]]``;
    raises ``ValueError`` for anything else. Senders on ``node`` keep their own ids."""
    try:
        request, epoch, last, raw = msgpack.unpackb(data[1:], raw=True)
        kept: list[Kept] = []
        for entry_id, fields in raw or []:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            frame = decode(values[b"f"])
            at = float(values[b"t"])
            origin = (
                Origin(frame.peer_id, frame.listener, frame.transport, frame.user)
                if frame.node == node
                else remote_origin(frame)
            )
            offset = int(entry_id.partition(b"-")[0]) - len(frame.payloads) + 1
            kinds = frame.kinds
            for index, payload in enumerate(frame.payloads):
                kind = None if kinds is None else kinds[index]
                kept.append((offset + index, origin, kind, payload, at))
        return Recalled(int(request), epoch.decode("ascii"), int(last), kept)
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as e:
        raise ValueError(f"not a recall answer: {e}") from None


def owed(
    recalled: Recalled,
    channel: str,
    since: tuple[int, str] | None,
    size: int,
    ttl: float,
    now: float,
) -> Recall:
    """What a peer starting on ``channel`` is owed, from a ``RECALL`` answer: with
    ``since``, every message after it when they are all still kept (``recovered``);
    else the newest ``history`` messages younger than ``ttl`` (0: any age)."""
    epoch, last = recalled.epoch, recalled.last
    kept = [
        entry[:4]
        for entry in recalled.kept
        if entry[0] > last - size and not (ttl and entry[4] <= now - ttl)
    ]
    if since is not None:
        offset, client_epoch = since
        whole = bool(kept) and kept[0][0] <= offset + 1 and kept[-1][0] == last
        if client_epoch == epoch and offset <= last and (offset == last or whole):
            after = [entry for entry in kept if entry[0] > offset]
            return Recall((last, epoch), _batches(channel, after, epoch, True), True)
    replay = _batches(channel, kept, epoch, False)
    return Recall((last, epoch), replay, None if since is None else False)


def _batches(
    channel: str,
    entries: Iterable[tuple[int, Origin, Kind | None, bytes]],
    epoch: str,
    recovered: bool,
) -> list[Batch]:
    """Kept messages as batches: one per run of one sender, typed alike, in order."""
    batches: list[Batch] = []
    for offset, origin, kind, payload in entries:
        last = batches[-1] if batches else None
        if (
            last is not None
            and last.origin is origin
            and (last.kinds is None) == (kind is None)
            and last.offset + len(last.payloads) == offset
        ):
            assert isinstance(last.payloads, list)
            last.payloads.append(payload)
            if kind is not None:
                assert isinstance(last.kinds, list)
                last.kinds.append(kind)
            continue
        batches.append(
            Batch(
                origin,
                channel,
                [payload],
                None if kind is None else [kind],
                history=not recovered,
                offset=offset,
                epoch=epoch,
                recovered=recovered,
            )
        )
    return batches
