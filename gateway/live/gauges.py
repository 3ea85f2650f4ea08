"""The routing state as Prometheus gauges, read at scrape time: per deployment, what routing sees now.

Health, circuit state, in-flight requests, the engine's queue and KV use (polled from its /metrics), and the
live TTFT, p95 latency and error rate routing scores with. Edge nodes appear as `edge/<node>` backends. Read
on the event loop (the /metrics handler), like everything in `RoutingState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.live.breaker import BreakerState
from gateway.live.state import RoutingState

PREFIX = "switchboard_deployment"
_LABELS = ["model", "backend", "kind"]


class DeploymentGauges(Collector):
    def __init__(self, routing: RoutingState, now_s: Callable[[], float]) -> None:
        self._routing, self._now_s = routing, now_s

    def collect(self) -> Iterator[Metric]:
        now_s = self._now_s()
        routing = self._routing
        families = {
            name: GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=_LABELS)
            for name, doc in (
                ("up", "1 while the deployment passes its health probe (0: out of routing)"),
                ("in_flight", "Requests this replica has running on the deployment"),
                ("queue_depth", "Requests waiting in the engine's queue (from its /metrics; 0 if unknown)"),
                ("kv_cache_used_ratio", "Engine KV-cache use, 0..1 (from its /metrics; 0 if unknown)"),
                ("ttft_seconds", "Time to first token routing expects (live EWMA, or the prior)"),
                ("p95_latency_seconds", "Live p95 request latency (0 before measurements)"),
                ("error_rate", "Live share of failed attempts"),
            )
        }
        circuit = GaugeMetricFamily(
            f"{PREFIX}_circuit_state",
            "1 for the circuit breaker's current state (closed, open, half_open)",
            labels=[*_LABELS, "state"],
        )
        for dep_id, (spec, stats) in routing.snapshot(now_s).deployments.items():
            labels = [spec.public_model, spec.backend, str(spec.backend_kind)]
            values = {
                "up": 1.0 if stats.healthy else 0.0,
                "in_flight": stats.in_flight,
                "queue_depth": stats.queue_depth,
                "kv_cache_used_ratio": stats.kv_cache_used_frac,
                "ttft_seconds": stats.ttft_ms / 1000,
                "p95_latency_seconds": stats.p95_latency_ms / 1000,
                "error_rate": stats.error_rate,
            }
            for name, value in values.items():
                families[name].add_metric(labels, float(value))
            state = routing.breakers.view(dep_id, now_s).state
            for each in BreakerState:
                circuit.add_metric([*labels, each.value], 1.0 if each is state else 0.0)
        yield from families.values()
        yield circuit
