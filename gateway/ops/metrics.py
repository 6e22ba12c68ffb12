"""Prometheus metrics, read from the gateway at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.config.settings import Config
from gateway.core.bus import Bus
from gateway.core.metrics import Metrics


class Health(Protocol):
    """What the admin endpoint asks the gateway."""

    bus: Bus
    metrics: Metrics
    config: Config  # the current one (a reload replaces it)

    def problems(self) -> list[str]:
        """Why the gateway is not healthy ([] when it is)."""

    def udp_peer_counts(self) -> dict[str, int]:
        """UDP peers per UDP listener."""

    def backplane_state(self) -> tuple[bool, int] | None:
        """(up, batches not forwarded) of the cluster backplane, or None without one."""

    def history_state(self) -> tuple[str, str | None, int]:
        """(kind, why it is failing or None, messages not written) of the history store."""


class GatewayCollector(Collector):
    """Prometheus metrics read from the gateway at scrape time."""

    def __init__(self, gateway: Health) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self.gateway
        metrics = gateway.metrics
        bus = gateway.bus

        connections = GaugeMetricFamily(
            "gateway_connections",
            "Peers attached, by listener and transport",
            labels=["listener", "transport"],
        )
        counts: dict[tuple[str, str], int] = {}
        for peer in bus.attached():
            key = (peer.origin.listener, peer.origin.transport)
            counts[key] = counts.get(key, 0) + 1
        for key, value in sorted(counts.items()):
            connections.add_metric(list(key), value)
        yield connections

        yield _counter(
            "gateway_messages_received",
            "Messages received from peers",
            ["listener", "transport"],
            metrics.messages_received,
        )
        yield _counter(
            "gateway_bytes_received",
            "Payload bytes received from peers",
            ["listener", "transport"],
            metrics.bytes_received,
        )
        delivered, delivered_bytes = bus.delivered_totals()
        yield _counter(
            "gateway_messages_delivered",
            "Messages handed to receivers",
            ["listener", "transport"],
            delivered,
        )
        yield _counter(
            "gateway_bytes_delivered",
            "Payload bytes handed to receivers",
            ["listener", "transport"],
            delivered_bytes,
        )
        yield _counter(
            "gateway_messages_dropped",
            "Messages not relayed or not delivered, by reason",
            ["reason"],
            metrics.dropped,
        )
        yield _counter(
            "gateway_disconnects",
            "Peers the gateway disconnected or refused, by reason",
            ["reason"],
            metrics.disconnects,
        )
        yield _counter(
            "gateway_auth",
            "Sign-ins by listener, method and result (ok, failed, timeout)",
            ["listener", "method", "result"],
            metrics.sign_ins,
        )
        yield _counter(
            "gateway_authz_denied",
            "Actions refused by a peer's permissions, by action (publish, subscribe)",
            ["action"],
            metrics.denied,
        )
        yield _counter(
            "gateway_tls_handshake_failures",
            "Connections that did not complete their TLS handshake",
            ["listener"],
            metrics.tls_handshake_failures,
        )
        throttled = CounterMetricFamily(
            "gateway_throttled", "Times a stream sender was paused for its message rate"
        )
        throttled.add_metric([], metrics.throttled)
        yield throttled
        remote = CounterMetricFamily(
            "gateway_remote_messages_received", "Messages other cluster nodes relayed to this one"
        )
        remote.add_metric([], metrics.remote_messages_received)
        yield remote

        channels = GaugeMetricFamily(
            "gateway_channels", "Channel names and patterns with at least one subscriber"
        )
        channels.add_metric([], bus.routes.keys)
        yield channels
        subscriptions = GaugeMetricFamily(
            "gateway_subscriptions", "Subscriptions of attached peers (their own channel included)"
        )
        subscriptions.add_metric([], bus.subscription_count())
        yield subscriptions

        udp = GaugeMetricFamily("gateway_udp_peers", "UDP peers, by listener", labels=["listener"])
        for listener, count in sorted(gateway.udp_peer_counts().items()):
            udp.add_metric([listener], count)
        yield udp

        histogram = metrics.fan_out_seconds
        fan_out = HistogramMetricFamily(
            "gateway_fan_out_seconds", "Time to hand one batch to every local receiver"
        )
        fan_out.add_metric(
            [],
            [(_bound(bound), count) for bound, count in histogram.cumulative()],
            sum_value=histogram.total,
        )
        yield fan_out

        state = gateway.backplane_state()
        if state is not None:
            up, unforwarded = state
            backplane = GaugeMetricFamily(
                "gateway_backplane_up", "1 while the cluster backplane is connected"
            )
            backplane.add_metric([], 1 if up else 0)
            yield backplane
            lost = CounterMetricFamily(
                "gateway_backplane_unforwarded", "Batches that could not be sent to the backplane"
            )
            lost.add_metric([], unforwarded)
            yield lost

        kind, problem, unwritten = gateway.history_state()
        store = GaugeMetricFamily(
            "gateway_history_store_up",
            "1 while the history store writes (the memory store: always)",
            labels=["store"],
        )
        store.add_metric([kind], 0 if problem is not None else 1)
        yield store
        if kind != "memory":
            behind = CounterMetricFamily(
                "gateway_history_unwritten",
                "Messages numbered but never written to the history store (left out or failed)",
            )
            behind.add_metric([], unwritten)
            yield behind


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def _counter(name: str, text: str, labels: list[str], values: Any) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family
