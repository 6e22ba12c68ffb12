"""docs/grafana/gateway.json against the real gateway: an importable dashboard whose every
metric name is a sample that ``/metrics`` of a running gateway exposes.

The gateway is started with what makes every series appear: a ``[cluster]`` on a real
``redis-server`` (the backplane metrics), ``[history] store = "redis"`` (the history store's),
and traffic on tcp, udp and tls listeners (messages, bytes, a drop and a disconnect for an
oversize line, a failed TLS handshake, UDP peers, fan-out batches).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TIMEOUT, Datagram, Line, admin_get
from tests.toml import toml_listener, toml_table

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana" / "gateway.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"(?<![\w:])gateway_[A-Za-z0-9_:]*")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every target and every template variable."""
    found = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else str(query))
    return found


def metric_names(dashboard: dict[str, Any]) -> set[str]:
    return {name for query in queries(dashboard) for name in METRIC.findall(query)}


def unknown(names: set[str], exposition: str) -> list[str]:
    """Why each name that is not a sample of ``exposition`` is wrong (``[]``: all are)."""
    samples: set[str] = set()
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(exposition):
        kinds[family.name] = family.type
        samples.update(sample.name for sample in family.samples)
    problems = []
    for name in sorted(names - samples):
        if name in kinds:
            suffixes = SUFFIXES.get(kinds[name], ())
            problems.append(f"{name}: a {kinds[name]} family, query {' or '.join(suffixes)}")
            continue
        base = next(
            (name.removesuffix(s) for ss in SUFFIXES.values() for s in ss if name.endswith(s)),
            name,
        )
        if base in kinds:
            problems.append(f"{name}: no such sample of the {kinds[base]} {base} (yet)")
        else:
            problems.append(f"{name}: not exposed")
    return problems


def test_the_dashboard_is_an_importable_grafana_model() -> None:
    dashboard = load()
    [source] = dashboard["__inputs"]
    assert source["name"] == "DS_PROMETHEUS"
    assert (source["type"], source["pluginId"]) == ("datasource", "prometheus")
    assert dashboard["id"] is None  # Grafana gives it one on import
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert METRIC.search(target["expr"]), target["expr"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == DATASOURCE
    for query in queries(dashboard):
        depth = {"(": 0, "{": 0, "[": 0}
        for char, closing in (("(", ")"), ("{", "}"), ("[", "]")):
            depth[char] = query.count(char) - query.count(closing)
        assert set(depth.values()) == {0}, f"unbalanced: {query}"
        assert query.count('"') % 2 == 0, f"unbalanced quotes: {query}"


def test_the_checker_names_wrong_metrics() -> None:
    exposition = (
        "# TYPE gateway_fan_out_seconds histogram\n"
        'gateway_fan_out_seconds_bucket{le="+Inf"} 1.0\n'
        "gateway_fan_out_seconds_sum 0.1\ngateway_fan_out_seconds_count 1.0\n"
        "# TYPE gateway_messages_dropped counter\n"
        'gateway_messages_dropped_total{reason="oversize"} 1.0\n'
    )
    fine = {"gateway_fan_out_seconds_bucket", "gateway_messages_dropped_total"}
    assert unknown(fine, exposition) == []
    wrong = {"gateway_fan_out_seconds", "gateway_messages_dropped", "gateway_messages_droped_total"}
    assert unknown(wrong, exposition) == [
        "gateway_fan_out_seconds: a histogram family, query _bucket or _sum or _count",
        "gateway_messages_droped_total: not exposed",
        "gateway_messages_dropped: a counter family, query _total",
    ]


@pytest.mark.timeout(60)
def test_every_metric_of_the_dashboard_is_on_metrics(run_gateway, redis_server, tmp_path) -> None:
    names = metric_names(load())
    assert len(names) >= 15, names
    gw = run_gateway(
        toml_table("admin", port=0)
        + toml_table("cluster", redis=redis_server.url, node="n1", prefix="grafana")
        + toml_table("history", store="redis")
        + toml_table("limits", max_message_bytes=64)
        + toml_listener("tcp")
        + toml_listener("udp")
        + toml_listener("tls", certs=tmp_path / "certs", generate_dev_cert=True),
        listeners=4,  # and the admin listener
    )
    gw.wait_for("backplane up")
    sender, receiver, too_long = Line(gw.ports["tcp"]), Line(gw.ports["tcp"]), Line(gw.ports["tcp"])
    udp = Datagram(gw.ports["udp"])
    udp.send(b"\n")  # joins
    sender.send(b"hello\n")
    assert b"hello" in receiver.line()
    too_long.send(b"x" * 100 + b"\n")  # dropped and disconnected: oversize
    assert too_long.closed()
    with socket.create_connection(("127.0.0.1", gw.ports["tls"]), timeout=TIMEOUT) as raw:
        raw.sendall(b"not a TLS hello\r\n\r\n")  # a failed handshake
        raw.settimeout(TIMEOUT)
        while raw.recv(4096):
            pass
    deadline = time.monotonic() + TIMEOUT
    while True:
        code, exposition = admin_get(gw, "/metrics")
        assert code == 200
        problems = unknown(names, exposition)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for client in (sender, receiver, udp):
        client.close()
    assert problems == []
