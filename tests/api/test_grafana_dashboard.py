"""deploy/grafana/switchboard.json names only metrics that exist: every PromQL expression of every panel
and variable is parsed, and each metric name it uses must be one a live gateway's /metrics lists (edge and
batch on) or one the engine server's registry defines, with Prometheus' suffix rules (`_total` for counters,
`_bucket`/`_count`/`_sum` for histograms, `_info` for info)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backends.local.metrics import EngineMetrics
from gateway.config import parse_config
from gateway.http.app import create_app
from tests.support.api_gateway import ADMIN_KEY
from tests.support.live import LiveServer

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "switchboard.json"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created", ""),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
}
# PromQL words that are neither metrics nor followed by "(".
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def exported_names(exposition: str) -> set[str]:
    """Every series name an exposition can carry, from its families' names and types."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, label matchers, grouping labels, ranges,
    strings and Grafana variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # $__rate_interval, ${datasource}
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+(e\d+)?", word) or match.start() > 0 and text[match.start() - 1].isdigit():
            continue  # 1e-9 (its "e"), numbers
        found.add(word)
    return found


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield f"panel {panel['id']} {panel['title']!r}", target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*?)(?:,\s*\w+)?\)", query)
            yield f"variable {var['name']}", inner.group(1) if inner else query


@pytest.fixture(scope="module")
def gateway_exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    os.environ["SB_TEST_ADMIN_KEY"] = ADMIN_KEY
    tmp = tmp_path_factory.mktemp("grafana")
    config = parse_config(
        {
            "server": {"admin_key_env": "SB_TEST_ADMIN_KEY"},
            "database": {"url": f"sqlite:///{tmp}/sb.db", "spill_path": str(tmp / "spill")},
            "backends": {
                "gpu": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
                "edge": {"kind": "edge"},
            },
            "models": {
                "m": {"deployments": [{"backend": "gpu"}, {"backend": "edge", "upstream_model": "m"}]}
            },
            "teams": {"t": {"models": ["*"]}},
        }
    )
    with LiveServer(create_app(config)) as server:
        reply = httpx.get(f"{server.base_url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    reply.raise_for_status()
    return reply.text


def engine_exposition() -> str:
    """The engine server's registry as it is built (load gauges and config info included)."""
    from backends.local.engine.engine import EngineStats

    metrics = EngineMetrics()
    metrics.describe({"dtype": "bf16"})
    fields = {name: 0 for name in EngineStats.__dataclass_fields__}
    metrics.watch(lambda: EngineStats(**fields))
    registry: CollectorRegistry = metrics.registry
    return generate_latest(registry).decode()


def test_the_parser_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, backend) (rate(a_bucket{team=~"$team", x="b_total"}[5m]))) '
        "/ clamp_min(sum without (pod) (b_total offset 1h), 1e-9) and on(team) c unless ${datasource}"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_every_query_names_an_exported_metric(gateway_exposition: str) -> None:
    exported = exported_names(gateway_exposition) | exported_names(engine_exposition())
    # What the gateway must export for the dashboard's rows to mean anything (a missing family fails here).
    for family in (
        "switchboard_requests_total",
        "switchboard_deployment_circuit_state",
        "switchboard_edge_nodes_connected",
        "switchboard_batch_items_queued",
        "switchboard_engine_kv_cache_usage_ratio",
    ):
        assert family in exported
    dashboard = json.loads(DASHBOARD.read_text())
    used: dict[str, set[str]] = {}
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(where)
    unknown = {name: sorted(places) for name, places in used.items() if name not in exported}
    assert not unknown, f"metrics the gateway and engine do not export: {unknown}"
    assert len(used) >= 25  # traffic, latency, spend, cache, limits, breakers, engine, edge, batches


def test_the_dashboard_is_portable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    topics = (
        "requests",
        "error",
        "latency",
        "ttft",
        "spend",
        "cache",
        "limits",
        "circuit",
        "queue",
        "kv",
        "edge",
    )
    assert [t for t in topics if t not in titles] == []


def test_deployment_gauges_say_what_routing_sees(gateway_exposition: str) -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(gateway_exposition)
        for s in family.samples
        if s.name.startswith("switchboard_deployment_")
    }
    gpu = (("backend", "gpu"), ("kind", "openai"), ("model", "m"))
    assert samples[("switchboard_deployment_up", gpu)] == 1.0
    assert samples[("switchboard_deployment_in_flight", gpu)] == 0.0
    states = {dict(k)["state"]: v for (n, k), v in samples.items() if n.endswith("circuit_state")}
    assert states == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
    assert samples[("switchboard_deployment_ttft_seconds", gpu)] == 0.5  # the config prior, 500 ms
