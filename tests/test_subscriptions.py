"""Subscriptions on the bus: names and patterns, delivered exactly once, counted, bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.archive import Recall, recall
from gateway.core.bus import Bus, SubscriptionError
from gateway.core.channels import matches
from gateway.core.history import deliver_all
from gateway.testing import MemoryGateway
from gateway.transports.app import AppPeer, Message


def peer(bus: Bus, channel: str = "main", echo: bool = False) -> tuple[AppPeer, list[Message]]:
    got: list[Message] = []
    return AppPeer(bus, got.append, channel=channel, echo=echo), got


def test_a_pattern_subscription_receives_matching_channels_only():
    bus = Bus()
    sender, _ = peer(bus)
    watcher, got = peer(bus, channel="watcher")
    watcher.subscribe("room.*")
    sender.publish("in 42", channel="room.42")
    sender.publish("too deep", channel="room.42.x")
    sender.publish("elsewhere", channel="hall")
    assert [(m.channel, m.text) for m in got] == [("room.42", "in 42")]


def test_overlapping_subscriptions_deliver_once_and_count_once():
    bus = Bus()
    sender, _ = peer(bus)
    both, got = peer(bus, channel="room.1")
    both.subscribe("room.*")
    both.subscribe("room.>")
    both.subscribe(">")
    assert sender.publish("a", "b", channel="room.1") == 1
    assert [m.text for m in got] == ["a", "b"]
    info = bus.peer_info(both)
    assert info is not None
    assert info["messages_out"] == 2 and info["bytes_out"] == 2
    assert info["subscriptions"] == ["room.1", "room.*", "room.>", ">"]
    messages, _ = bus.delivered_totals()
    assert messages["app", "app"] == 2


def test_the_sender_gets_nothing_of_its_own_through_any_subscription():
    bus = Bus()
    sender, own = peer(bus, channel="room.1")
    sender.subscribe("room.*")
    _other, got = peer(bus, channel="room.1")
    sender.publish("x")
    assert own == [] and [m.text for m in got] == ["x"]
    assert bus.peer_info(sender)["messages_out"] == 0  # type: ignore[index]
    echo, heard = peer(bus, channel="room.1", echo=True)
    echo.subscribe("room.*")
    echo.publish("mine")
    assert [m.text for m in heard] == ["mine"]  # once, with echo


def test_unsubscribing_stops_delivery_and_keeps_the_counts():
    bus = Bus()
    sender, _ = peer(bus)
    listener, got = peer(bus, channel="x")
    listener.subscribe("room.*")
    sender.publish("one", channel="room.1")
    listener.unsubscribe("room.*")
    sender.publish("two", channel="room.1")
    assert [m.text for m in got] == ["one"]
    assert bus.peer_info(listener)["messages_out"] == 1  # type: ignore[index]
    with pytest.raises(SubscriptionError) as error:
        listener.unsubscribe("room.*")
    assert error.value.code == "not_subscribed"


def test_limits_and_error_codes():
    bus = Bus(max_subscriptions=3, max_channels=5)
    one, _ = peer(bus)
    assert one.subscribe("a") is True
    assert one.subscribe("a") is False  # already: not an error, nothing changes
    one.subscribe("b.*")
    with pytest.raises(SubscriptionError) as error:
        one.subscribe("c")
    assert error.value.code == "too_many_subscriptions"
    with pytest.raises(SubscriptionError) as error:
        one.subscribe("a..b")
    assert error.value.code == "bad_channel"
    two, _ = peer(bus)
    two.subscribe("d")
    two.subscribe("e")
    three, _ = peer(bus)
    with pytest.raises(SubscriptionError) as error:
        three.subscribe("f")  # main, a, b.*, d, e: five in use
    assert error.value.code == "too_many_channels"
    three.subscribe("a")  # an existing one costs nothing more
    with pytest.raises(ValueError):
        one.publish("x", channel="room.*")


def test_presence_is_per_exact_subscription_and_says_the_channel():
    bus = Bus()
    seen: list[tuple[str, str, str]] = []

    def watcher(channel: str):
        def watch(event: str, who: object, count: int) -> None:
            seen.append((event, who.origin.peer_id, channel))  # type: ignore[attr-defined]

        return watch

    for channel in ("room.1", "room.*"):
        bus.watch_presence(channel, watcher(channel))
    someone, _ = peer(bus)
    someone.subscribe("room.1")
    someone.subscribe("room.*")  # patterns have no presence
    someone.close()
    assert seen == [("join", "app-1", "room.1"), ("leave", "app-1", "room.1")]


def test_history_replays_for_a_subscribed_channel():
    bus = Bus()
    bus.history.resize(lambda name: 2 if name.startswith("room.") else 0)
    sender, _ = peer(bus)
    sender.publish("a", "b", "c", channel="room.1")
    late, got = peer(bus, channel="x")
    late.subscribe("room.1")
    found: list[Recall] = []
    recall(bus, late, "room.1", None, found.append)
    assert found[0].position == (3, bus.history.position("room.1")[1])  # type: ignore[index]
    assert deliver_all(late, found[0].batches) == 2
    assert [(m.text, m.history) for m in got] == [("b", True), ("c", True)]


NAMES = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(".".join)
PATTERNS = st.one_of(
    NAMES,
    st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=3).map(".".join),
    st.lists(st.sampled_from(["a", "*"]), min_size=0, max_size=2).map(
        lambda t: ".".join([*t, ">"])
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(NAMES, st.lists(PATTERNS, max_size=4), st.booleans()), min_size=1, max_size=6
    ),
    st.lists(st.tuples(st.integers(0, 5), NAMES), min_size=1, max_size=8),
)
def test_every_message_reaches_exactly_the_peers_whose_subscriptions_match(peers, publishes):
    bus = Bus()
    made = []
    for channel, patterns, echo in peers:
        app, got = peer(bus, channel=channel, echo=echo)
        for pattern in patterns:
            app.subscribe(pattern)
        made.append((app, got, {channel, *patterns}, echo))
    for number, (index, channel) in enumerate(publishes):
        sender = made[index % len(made)][0]
        sender.publish(f"m{number}", channel=channel)
    for app, got, subscriptions, echo in made:
        expected = [
            f"m{number}"
            for number, (index, channel) in enumerate(publishes)
            if any(matches(s, channel) for s in subscriptions)
            and (echo or made[index % len(made)][0] is not app)
        ]
        assert [m.text for m in got] == expected
        assert bus.peer_info(app)["messages_out"] == len(expected)  # type: ignore[index]


def test_an_app_peer_subscribes_across_transports_in_a_running_gateway():
    gw = MemoryGateway(
        '[[listeners]]\nname = "rooms"\ntype = "tcp"\nport = 1\nchannel = "room.1"\n'
        '[[listeners]]\nname = "hall"\ntype = "tcp"\nport = 2\nchannel = "hall"\n'
    )
    heard: list[Message] = []
    dashboard = gw.service.app_peer(heard.append, channel="dashboard")
    dashboard.subscribe(">")
    room, hall = gw.connect("rooms"), gw.connect("hall")
    room.send(b"in the room\n")
    hall.send(b"in the hall\n")
    assert [(m.channel, m.text) for m in heard] == [
        ("room.1", "in the room"),
        ("hall", "in the hall"),
    ]
    dashboard.publish("to the room", channel="room.1")
    gw.flush()
    assert room.lines() == [b"to the room"] and hall.lines() == []
    gw.stop()


def test_limits_come_from_the_config_and_follow_a_reload():
    config = (
        '[limits]\nmax_subscriptions = 2\n[[listeners]]\nname = "tcp"\ntype = "tcp"\nport = 1\n'
    )
    gw = MemoryGateway(config)
    app = gw.service.app_peer(channel="one")
    app.subscribe("two")
    with pytest.raises(SubscriptionError):
        app.subscribe("three")
    gw.reload(config.replace("max_subscriptions = 2", "max_subscriptions = 3"))
    app.subscribe("three")
    gw.connect("tcp")
    from gateway.ops.admin import AdminSite

    site = AdminSite(gw.service, gw.reactor)
    metrics = site.metrics(_Request()).decode()  # type: ignore[arg-type]
    assert "gateway_channels 4.0" in metrics  # one, two, three, main
    assert "gateway_subscriptions 4.0" in metrics  # the app peer's three, the tcp peer's one
    gw.stop()


class _Request:
    def setHeader(self, name: bytes, value: bytes) -> None:
        pass
