"""The fast paths of the JSON envelopes: plain requests and verbatim text mean exactly what
the general path (a JSON parse per request, a JSON encode per message) makes of them."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.message import Batch, Kind, Origin
from gateway.testing import MemoryGateway
from gateway.transports.envelopes import (
    RequestError,
    compact,
    message_envelopes,
    parse_request,
    plain_message,
    plain_message_runs,
    verbatim_envelopes,
)
from gateway.transports.line import JSON_LINE_FRAMER

# Text near the edges of "nothing to escape": quotes, backslashes, controls, non-ASCII.
TEXT = st.text(alphabet=st.sampled_from('ab "\\\x00\x1f\x7fé€\U0001f600\n\r\t/'), max_size=12)
CHANNELS = st.sampled_from(["room.42", "a", "room.*", "x.>", "", "é", "a..b", "sensors.7.temp"])


def plain(channel: str, text: str) -> bytes:
    text = f'{{"type":"message","channel":"{channel}","text":"{text}"}}'
    return text.encode("utf-8", "surrogatepass")


def general(data: bytes) -> tuple[str, bytes, Kind] | str | None:
    """What the general path makes of ``data``: (channel, payload, kind), an error code,
    or None (relayed as raw text)."""
    try:
        request = parse_request(data)
    except RequestError as e:
        return str(e.event["code"])
    if request is None or request.type != "message" or request.channel is None:
        return None
    return request.channel, request.payload, request.kind


# Requests as a client might write them: mostly the plain form, with raw (unescaped) or
# JSON-escaped text, some other orders and fields, some broken bytes.
REQUESTS = st.one_of(
    st.builds(plain, CHANNELS, TEXT),
    st.builds(lambda c, t: plain(c, json.dumps(t)[1:-1]), CHANNELS, TEXT),
    st.builds(
        lambda c, t: compact({"channel": c, "type": "message", "text": t}).encode(), CHANNELS, TEXT
    ),
    st.builds(lambda c, t: plain(c, t) + b" ", CHANNELS, TEXT),
    st.builds(lambda c, b: plain(c, "x") + b, CHANNELS, st.binary(max_size=3)),
    st.binary(max_size=60),
)


@settings(max_examples=500)
@given(REQUESTS)
@example(b'{"type":"message","channel":"a","text":"\xed\xa0\x80"}')  # a lone surrogate
@example(b'{"type":"message","channel":"a","text":"\xff"}')
def test_a_plain_request_means_what_the_general_parse_makes_of_it(data):
    fast = plain_message(data)
    if fast is not None:
        assert general(data) == (fast[0], fast[1], Kind.TEXT)


@settings(max_examples=300)
@given(st.lists(REQUESTS, min_size=1, max_size=6))
def test_a_read_of_plain_requests_is_split_into_the_same_runs(requests):
    lines = [r for r in requests if b"\n" not in r]
    if not lines:
        return
    runs = plain_message_runs(b"".join(line + b"\n" for line in lines), len(lines))
    # A line's one trailing "\r" is not part of it (docs/protocol.md).
    each = [plain_message(line[:-1] if line.endswith(b"\r") else line) for line in lines]
    if runs is None:
        assert None in each
        return
    assert [(c, p) for c, payloads in runs for p in payloads] == each
    assert all(a[0] != b[0] for a, b in itertools.pairwise(runs))  # runs are maximal


def test_the_plain_form():
    assert plain_message(plain("room.42", "hi é")) == ("room.42", "hi é".encode())
    assert plain_message(plain("room.*", "hi")) is None  # a wildcard: bad_channel, the long way
    assert plain_message(plain("room.42", "a\\nb")) is None  # an escape


def test_a_read_with_crlf_endings_is_plain_too():
    chunk = plain("a", "1") + b"\r\n" + plain("a", "2") + b"\n"
    assert plain_message_runs(chunk, 2) == [("a", [b"1", b"2"])]
    assert plain_message_runs(chunk + b"\n", 3) is None  # an empty line: the general path


def reference(batch: Batch) -> list[bytes]:
    """The message events of ``batch`` by the general encoder, one JSON encode each."""
    kinds: list[Kind | None] = [None] * len(batch.payloads)
    if batch.kinds is not None:
        kinds = list(batch.kinds)
    out: list[bytes] = []
    for payload, kind in zip(batch.payloads, kinds, strict=True):
        fields: dict[str, Any] = {
            "type": "message",
            "from": batch.origin.peer_id,
            "transport": batch.origin.transport,
            "listener": batch.origin.listener,
            "channel": batch.channel,
        }
        if batch.origin.user is not None:
            fields["user"] = batch.origin.user
        if batch.history:
            fields["history"] = True
        if batch.recovered:
            fields["recovered"] = True
        if batch.epoch is not None:
            fields["offset"] = batch.offset + len(out)
            fields["epoch"] = batch.epoch
        try:
            if kind is Kind.BINARY:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "binary")
            fields["text"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            fields["base64"] = base64.b64encode(payload).decode()
        out.append(compact(fields).encode("utf-8"))
    return out


PAYLOADS = st.one_of(TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=6))


@settings(max_examples=500)
@given(
    st.lists(PAYLOADS, min_size=1, max_size=5),
    st.sampled_from([None, "text", "binary"]),
    st.booleans(),
)
@example([b"\xc3", b"\xa9"], None, False)  # valid only when joined
def test_verbatim_text_makes_the_same_events_as_the_json_encoder(payloads, kind, history):
    kinds = None if kind is None else [Kind(kind)] * len(payloads)
    if kind == "text":
        payloads = [p for p in payloads if Kind.of(p) is Kind.TEXT] or [b"t"]
        kinds = [Kind.TEXT] * len(payloads)
    batch = Batch(Origin("tcp-1", "in", "tcp"), 'ro"om', payloads, kinds, history=history)
    expected = reference(batch)
    assert message_envelopes(batch) == expected
    assert JSON_LINE_FRAMER.frame(batch) == b"".join(e + b"\n" for e in expected)
    verbatim = verbatim_envelopes(batch)
    if verbatim is not None:
        assert all(b'"text":' in e for e in expected)


@settings(max_examples=300)
@given(
    st.lists(PAYLOADS, min_size=1, max_size=5),
    st.sampled_from([None, "binary"]),
    st.sampled_from([(True, False), (False, True), (False, False)]),
    st.integers(1, 10**12),
    st.sampled_from(["e", "50%", "%d%b", 'q"é']),
)
def test_numbered_messages_carry_their_offset_and_epoch_as_the_json_encoder_would(
    payloads, kind, flags, offset, epoch
):
    kinds = None if kind is None else [Kind.BINARY] * len(payloads)
    history, recovered = flags
    origin = Origin("tcp-1%s", "in%d", "tcp", user="50%é")  # a literal % anywhere
    batch = Batch(origin, "room", payloads, kinds, history=history, offset=offset, epoch=epoch)
    batch.recovered = recovered
    expected = reference(batch)
    assert [json.loads(e)["offset"] for e in expected] == list(
        range(offset, offset + len(payloads))
    )
    assert message_envelopes(batch) == expected
    assert JSON_LINE_FRAMER.frame(batch) == b"".join(e + b"\n" for e in expected)
    assert verbatim_envelopes(batch) is None  # offsets differ per message: no shared head


def test_a_json_lines_client_publishes_plain_runs_to_their_channels_in_order():
    gw = MemoryGateway(
        '[[listeners]]\nname = "lines"\ntype = "tcp"\nport = 8007\nformat = "json"\n'
    )
    try:
        sender, a, b, both = (gw.connect("lines") for _ in range(4))
        for client, channels in ((a, ["ch.a"]), (b, ["ch.b"]), (both, ["ch.a", "ch.b"])):
            client.send(
                b"".join(b'{"type":"subscribe","channel":"%s"}\n' % c.encode() for c in channels)
            )
        gw.flush()
        for client in (sender, a, b, both):
            client.lines()
        sender.send(
            plain("ch.a", "1")
            + b"\n"
            + plain("ch.a", "2")
            + b"\n"
            + plain("ch.b", "3")
            + b"\n"
            + plain("ch.a", "é4")
            + b"\n"
        )
        gw.flush()

        def texts(client: Any) -> list[tuple[str, str]]:
            return [(e["channel"], e["text"]) for e in map(json.loads, client.lines())]

        assert texts(a) == [("ch.a", "1"), ("ch.a", "2"), ("ch.a", "é4")]
        assert texts(b) == [("ch.b", "3")]
        assert texts(both) == [("ch.a", "1"), ("ch.a", "2"), ("ch.b", "3"), ("ch.a", "é4")]
        assert texts(sender) == []  # no echo
        # One wildcard publish in the read: the general path answers it, and publishes the rest.
        sender.send(plain("ch.a", "5") + b"\n" + plain("ch.*", "6") + b"\n")
        gw.flush()
        assert texts(a) == [("ch.a", "5")]
        error = json.loads(sender.lines()[0])
        assert error["type"] == "error" and error["code"] == "bad_channel"
    finally:
        gw.stop()
