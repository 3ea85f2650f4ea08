"""Prometheus metrics for one app instance, fed from the same `UsageRecord` the ledger gets.

Each app owns its registry (no module-level state), so two apps in one process never mix their counts.
Per-request series carry the `endpoint` label (the API called, e.g. "chat.completions"), as the ledger does.
`switchboard_capacity_tokens_total` counts tokens by the class of capacity that served them (`capacity_of`
maps a ledger backend name to owned, edge or cloud) and by priority (batch items or interactive requests).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from gateway.records import UsageRecord

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LABELS = ("team", "model", "backend", "status", "endpoint")
_LIMIT_REASONS = {
    "rate_limit_exceeded": "rate",
    "insufficient_quota": "budget",
    "limiter_unavailable": "limiter_unavailable",
}


class Capacity(StrEnum):
    """What kind of capacity served a request's tokens."""

    OWNED = "owned"  # our own engines (self-hosted, internal tier)
    EDGE = "edge"  # edge nodes and edge-tier servers at a site
    CLOUD = "cloud"  # cloud APIs and external-tier servers
    CACHE = "cache"  # the response cache answered
    NONE = "none"  # no backend served (refused, or every attempt failed before one)


CapacityOf = Callable[[str], Capacity]  # a ledger backend name -> its capacity class


def _unknown(_backend: str) -> Capacity:
    return Capacity.NONE


class _Children:
    """A labelled metric's children by label values, found with one dict lookup. `labels()` checks, converts
    and locks on every call (about 1 us each, seven times per request); a child, once made, is the same
    object for as long as the metric lives, so it is kept here too."""

    __slots__ = ("_labels", "_found")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._labels = metric.labels
        self._found: dict[tuple[str, ...], Any] = {}

    def of(self, values: tuple[str, ...]) -> Any:
        child = self._found.get(values)
        if child is None:
            child = self._found[values] = self._labels(*values)
        return child


class GatewayMetrics:
    def __init__(self, capacity_of: CapacityOf = _unknown) -> None:
        self._capacity_of = capacity_of
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("switchboard_requests", "Requests, every endpoint", _LABELS, registry=r)
        self.latency = Histogram(
            "switchboard_request_latency_seconds",
            "End-to-end request latency",
            _LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "switchboard_ttft_seconds",
            "Time to first token of streamed responses",
            _LABELS,
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "switchboard_tokens",
            "Tokens processed",
            ("team", "model", "backend", "endpoint", "kind"),
            registry=r,
        )
        self.capacity_tokens = Counter(
            "switchboard_capacity_tokens",
            "Tokens served per capacity class (owned, edge, cloud, cache) and priority (interactive, batch)",
            ("capacity", "priority", "kind"),
            registry=r,
        )
        self.cost = Counter(
            "switchboard_cost_usd", "Cost in USD", ("team", "model", "backend", "endpoint"), registry=r
        )
        self.rejected = Counter(
            "switchboard_rejected_requests",
            "Requests refused before a team is known (bad key, bad body)",
            ("code",),
            registry=r,
        )

        self.cache = Counter(
            "switchboard_cache_lookups", "Response cache: hit, miss or skip", ("team", "result"), registry=r
        )
        self.limited = Counter(
            "switchboard_limited_requests",
            "Requests refused by the gateway's limits: rate (incl. concurrency), budget, limiter_unavailable",
            ("team", "reason"),
            registry=r,
        )
        self.budget_alerts = Counter(
            "switchboard_budget_soft_limit_crossed",
            "Budgets that crossed their soft limit (scope is team:<name> or key:<id>)",
            ("scope", "period"),
            registry=r,
        )
        self.saved = Counter(
            "switchboard_cache_saved_usd", "Cost the response cache saved", ("team", "model"), registry=r
        )
        # The per-request series, looked up by label values (`_Children`); created on first use, as before.
        self._requests, self._latency, self._ttft = (
            _Children(m) for m in (self.requests, self.latency, self.ttft)
        )
        self._tokens, self._cost = _Children(self.tokens), _Children(self.cost)
        self._capacity_tokens, self._cache = _Children(self.capacity_tokens), _Children(self.cache)

    def observe(self, rec: UsageRecord) -> None:
        backend = rec.backend or "none"
        labels = (rec.team, rec.requested_model, backend, rec.status.value, rec.endpoint)
        self._requests.of(labels).inc()
        self._latency.of(labels).observe(rec.latency_ms / 1000)
        if rec.ttft_ms is not None:
            self._ttft.of(labels).observe(rec.ttft_ms / 1000)
        where = (rec.team, rec.requested_model, backend, rec.endpoint)
        if rec.prompt_tokens:
            self._tokens.of((*where, "prompt")).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self._tokens.of((*where, "completion")).inc(rec.completion_tokens)
        self._count_capacity(rec)
        if rec.cost_saved_micro_usd:
            self.saved.labels(rec.team, rec.requested_model).inc(rec.cost_saved_micro_usd / 1_000_000)
        reason = _LIMIT_REASONS.get(rec.error_type or "")
        if reason is not None:
            self.limited.labels(rec.team, reason).inc()
        if rec.cost_micro_usd:
            self._cost.of(where).inc(rec.cost_micro_usd / 1_000_000)

    def cache_lookup(self, team: str, outcome: str) -> None:
        """One response-cache lookup's outcome: hit, miss or skip."""
        self._cache.of((team, outcome)).inc()

    def _count_capacity(self, rec: UsageRecord) -> None:
        if rec.cache_hit:
            capacity = Capacity.CACHE
        else:
            capacity = self._capacity_of(rec.backend) if rec.backend else Capacity.NONE
        priority = "batch" if rec.batch_id else "interactive"
        if rec.prompt_tokens:
            self._capacity_tokens.of((str(capacity), priority, "prompt")).inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self._capacity_tokens.of((str(capacity), priority, "completion")).inc(rec.completion_tokens)

    def add_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        gauge = Gauge(name, doc, registry=self.registry)
        gauge.set_function(read)

    def add_runtime_gauges(self, loop: asyncio.AbstractEventLoop) -> None:
        """What a soak watches for leaks: the process's RSS, open fds and CPU (`process_*`, read from /proc
        on Linux; absent elsewhere), the asyncio tasks alive on `loop` and the Python threads."""
        ProcessCollector(registry=self.registry)
        self.add_gauge(
            "switchboard_asyncio_tasks",
            "asyncio tasks alive on the serving event loop",
            lambda: float(len(asyncio.all_tasks(loop))),
        )
        self.add_gauge("switchboard_threads", "Python threads alive", lambda: float(threading.active_count()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
