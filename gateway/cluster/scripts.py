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

from gateway.cluster.wire import KINDS_BY_CODE
from gateway.core.archive import Recall
from gateway.core.message import Batch, Kind, Origin

SEQUENCE = b"""
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'last', 0)
end
local n = #ARGV - 9
local last = redis.call('HINCRBY', KEYS[1], 'last', n)
local first = last - n + 1
local kinds = ARGV[9]
for i = 1, n do
  local id = (first + i - 1) .. '-0'
  if kinds == '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id, 'h', ARGV[6], 'p', ARGV[9 + i])
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id, 'h', ARGV[6],
      'k', string.sub(kinds, i, i), 'p', ARGV[9 + i])
  end
end
if ARGV[5] ~= '0' then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
redis.call('PUBLISH', ARGV[1], '#' .. first .. ' ' .. epoch .. ' ' .. ARGV[7] .. ' ' .. ARGV[8])
redis.call('PUBLISH', ARGV[2], 'a' .. ARGV[7])
return first
"""
"""KEYS: position hash, stream. ARGV: channel's Redis channel, node's own Redis channel, an
epoch for a channel without one, MAXLEN, PEXPIRE ms (0: none), entry header, sequence
number, frame, kinds (one byte per message, empty: untyped), then the payloads."""

RECALL = b"""
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'last', 0)
end
local last = redis.call('HGET', KEYS[1], 'last')
local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[3])
redis.call('PUBLISH', ARGV[1], 'r' .. cmsgpack.pack({ARGV[2], epoch, last, entries}))
return 1
"""
"""KEYS: position hash, stream. ARGV: node's own Redis channel, request id, how many
messages at most, an epoch for a channel without one."""

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


Entry = tuple[int, bytes, bytes | None, bytes]
"""One kept message: offset, header (the batch's sender and time), kind byte, payload."""


class Recalled(NamedTuple):
    """A ``RECALL`` answer: the request it answers, the channel's epoch and last offset,
    and its newest kept messages, oldest first."""

    request: int
    epoch: str
    last: int
    entries: list[Entry]


def parse_recalled(data: bytes) -> Recalled:
    """``r`` + msgpack ``[request, epoch, last, [[id, [field, value, ...]], ...]]``
    (newest first); raises ``ValueError`` for anything else."""
    try:
        request, epoch, last, raw = msgpack.unpackb(data[1:], raw=True)
        entries: list[Entry] = []
        for entry_id, fields in reversed(raw or []):
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            offset = int(entry_id.partition(b"-")[0])
            entries.append((offset, values[b"h"], values.get(b"k"), values[b"p"]))
        return Recalled(int(request), epoch.decode("ascii"), int(last), entries)
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as e:
        raise ValueError(f"not a recall answer: {e}") from None


def pack_header(
    node: str, peer: str, listener: str, transport: str, user: str | None, at: float
) -> bytes:
    """What each kept message of a batch carries about it: who sent it, from where, when."""
    packed: bytes = msgpack.packb((node, peer, listener, transport, user, at))
    return packed


def unpack_header(header: bytes) -> tuple[str, str, str, str, str | None, float]:
    node, peer, listener, transport, user, at = msgpack.unpackb(header, raw=False)
    return str(node), str(peer), str(listener), str(transport), user, float(at)


def owed(
    recalled: Recalled,
    channel: str,
    since: tuple[int, str] | None,
    ttl: float,
    node: str,
    now: float,
) -> Recall:
    """What a peer starting on ``channel`` is owed, from a ``RECALL`` answer: with
    ``since``, every message after it when they are all still kept (``recovered``);
    else the newest ``history`` messages younger than ``ttl`` (0: any age)."""
    epoch, last = recalled.epoch, recalled.last
    headers: dict[bytes, tuple[Origin, float]] = {}
    kept: list[tuple[int, Origin, Kind | None, bytes]] = []
    for offset, header, kind, payload in recalled.entries:
        sender = headers.get(header)
        if sender is None:
            origin_node, peer, listener, transport, user, at = unpack_header(header)
            peer_id = peer if origin_node == node else f"{peer}@{origin_node}"
            sender = headers[header] = (Origin(peer_id, listener, transport, user), at)
        if ttl and sender[1] <= now - ttl:
            continue
        kept.append((offset, sender[0], KINDS_BY_CODE.get(kind[0]) if kind else None, payload))
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
