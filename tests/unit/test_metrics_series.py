"""`GatewayMetrics.observe` feeds each request to its own label set's series (looked up by label values,
not through `labels()` each time), and creates a series only when a request has something for it."""

from __future__ import annotations

import dataclasses
import datetime as dt

from gateway.metrics import Capacity, GatewayMetrics
from gateway.records import RequestStatus, UsageRecord

ROW = UsageRecord(
    request_id="r1",
    created_at=dt.datetime(2026, 12, 5, tzinfo=dt.UTC),
    team="t1",
    key_id="k1",
    requested_model="m1",
    backend="b1",
    served_model="m1",
    prompt_tokens=9,
    completion_tokens=12,
    cost_micro_usd=86,
    latency_ms=250.0,
    ttft_ms=None,
    status=RequestStatus.OK,
    http_status=200,
    error_type=None,
    stream=False,
    endpoint="chat.completions",
)


def _owned(backend: str) -> Capacity:
    return Capacity.OWNED if backend == "b1" else Capacity.CLOUD


def test_each_label_set_counts_its_own_requests_tokens_and_cost() -> None:
    m = GatewayMetrics(_owned)
    other = dataclasses.replace(ROW, team="t2", backend="b2", endpoint="responses", ttft_ms=40.0)
    for rec in (ROW, ROW, other):
        m.observe(rec)
    get = m.registry.get_sample_value
    one = {"team": "t1", "model": "m1", "backend": "b1", "endpoint": "chat.completions"}
    two = {"team": "t2", "model": "m1", "backend": "b2", "endpoint": "responses"}
    assert get("switchboard_requests_total", {**one, "status": "ok"}) == 2
    assert get("switchboard_requests_total", {**two, "status": "ok"}) == 1
    assert get("switchboard_request_latency_seconds_count", {**one, "status": "ok"}) == 2
    assert get("switchboard_request_latency_seconds_sum", {**one, "status": "ok"}) == 0.5
    assert get("switchboard_tokens_total", {**one, "kind": "prompt"}) == 18
    assert get("switchboard_tokens_total", {**one, "kind": "completion"}) == 24
    assert get("switchboard_tokens_total", {**two, "kind": "completion"}) == 12
    assert get("switchboard_cost_usd_total", one) == 2 * 86 / 1_000_000
    owned = {"capacity": "owned", "priority": "interactive"}
    assert get("switchboard_capacity_tokens_total", {**owned, "kind": "prompt"}) == 18
    cloud = {"capacity": "cloud", "priority": "interactive"}
    assert get("switchboard_capacity_tokens_total", {**cloud, "kind": "prompt"}) == 9
    assert get("switchboard_ttft_seconds_count", {**two, "status": "ok"}) == 1


def test_a_series_appears_only_once_a_request_has_something_for_it() -> None:
    m = GatewayMetrics()
    m.observe(dataclasses.replace(ROW, prompt_tokens=0, completion_tokens=0, cost_micro_usd=0))
    text = m.render().decode()
    assert 'switchboard_requests_total{backend="b1"' in text
    absent = ("ttft_seconds_count", "tokens_total", "cost_usd_total", "capacity_tokens_total")
    for name in absent:
        assert f"switchboard_{name}{{" not in text


def test_cache_lookups_count_per_team_and_outcome() -> None:
    m = GatewayMetrics()
    for team, outcome in (("t1", "miss"), ("t1", "miss"), ("t1", "hit"), ("t2", "skip")):
        m.cache_lookup(team, outcome)
    get = m.registry.get_sample_value
    assert get("switchboard_cache_lookups_total", {"team": "t1", "result": "miss"}) == 2
    assert get("switchboard_cache_lookups_total", {"team": "t1", "result": "hit"}) == 1
    assert get("switchboard_cache_lookups_total", {"team": "t2", "result": "skip"}) == 1
