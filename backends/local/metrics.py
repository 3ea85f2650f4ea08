"""The engine server's Prometheus metrics: request outcomes, token counters, latency histograms, engine load.

`EngineMetrics` is the engine's `EngineObserver` (called on the engine thread; prometheus_client metrics are
thread-safe) and reads load gauges from an `EngineStats` snapshot at scrape time. Names the gateway's poller
reads (gateway/live/engine_load.py) are `switchboard_engine_queue_depth` and
`switchboard_engine_running_requests`; keep them stable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.local.engine.engine import EngineStats, Failed, Finished

PREFIX = "switchboard_engine"
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class _LoadCollector(Collector):
    """Gauges (and monotonic counts the engine keeps) read from one stats snapshot per scrape."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = [
            ("queue_depth", "Requests waiting to run (new or preempted)", s.waiting),
            ("running_requests", "Requests in the running batch", s.running),
            ("kv_blocks_used", "KV-cache blocks held by requests", s.kv_blocks_used),
            ("kv_blocks_free", "KV-cache blocks free", s.kv_blocks_free),
            ("kv_blocks_total", "KV-cache blocks in all", s.kv_blocks_total),
            (
                "kv_cache_usage_ratio",
                "Fraction of KV-cache blocks in use (0..1)",
                s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
            ),
            (
                "spec_acceptance_ratio",
                "Accepted / proposed speculative draft tokens since start (0 before any draft)",
                s.accepted_tokens / s.drafted_tokens if s.drafted_tokens else 0.0,
            ),
            (
                "prefill_tokens_per_step",
                "Prompt tokens computed per step at most (--max-prefill-tokens; longer prompts are chunked)",
                s.prefill_tokens_per_step,
            ),
            (
                "short_prefill_tokens",
                "Interactive prompts with at most this many tokens left go ahead of longer ones' chunks "
                "(--short-prefill-tokens; 0: oldest first)",
                s.short_prefill_tokens,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = [
            (
                "preemptions",
                "Running requests preempted (to be recomputed) for want of KV blocks",
                s.preemptions,
            ),
            (
                "prefix_hit_tokens",
                "Prompt tokens served from cached prefix blocks instead of computed",
                s.prefix_hit_tokens,
            ),
            ("spec_drafted_tokens", "Speculative draft tokens proposed", s.drafted_tokens),
            ("spec_accepted_tokens", "Speculative draft tokens accepted", s.accepted_tokens),
            (
                "suspended_steps",
                "Steps with batch rows suspended between two layers to serve interactive arrivals",
                s.suspended_steps,
            ),
            ("interleaved_steps", "Interactive steps run inside suspended ones", s.interleaved_steps),
            (
                "requeued_late",
                "Requests that missed their own x-switchboard-deadline-ms before a first token, re-queued "
                "as if without one (behind those still on time, for --default-deadline-ms at most)",
                s.requeued_late,
            ),
            (
                "short_steps",
                "Steps that computed short prompts (--short-prefill-tokens) alone, longer prompts' chunks "
                "put off to the next step",
                s.short_steps,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class EngineMetrics:
    """One registry per app; also the engine's observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests by outcome (ok, cancelled, error, rejected)",
            ["outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled (once per request)", registry=self.registry
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens generated", registry=self.registry
        )
        self.late_first_tokens = Counter(
            f"{PREFIX}_late_first_tokens",
            "First tokens later than their request's deadline (x-switchboard-deadline-ms, else "
            "--default-deadline-ms)",
            registry=self.registry,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between successive generated tokens of one request",
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        )

    def describe(self, config: dict[str, str], autotune: Any = None) -> None:
        """Export what the engine runs (`config` labels) and the candidates' timings when `auto` was timed."""
        Info(
            f"{PREFIX}_config", "Compute dtype, quantization and kernel ISA in use", registry=self.registry
        ).info(config)
        if autotune is None:
            return
        gauge = Gauge(
            f"{PREFIX}_autotune_step_ms",
            "Timed step of each autotune candidate (shape: decode1, decode8, prefill64)",
            ["dtype", "quant", "shape", "chosen"],
            registry=self.registry,
        )
        for row in autotune.table:
            chosen = str((row.dtype, row.quant) == (autotune.dtype, autotune.quant)).lower()
            for shape, value in (
                ("decode1", row.decode1_ms),
                ("decode8", row.decode8_ms),
                ("prefill64", row.prefill_ms),
            ):
                gauge.labels(row.dtype, row.quant, shape, chosen).set(value)

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Export the engine's load (queue depth, running, KV blocks, speculation) on every scrape."""
        self.registry.register(_LoadCollector(stats))

    # EngineObserver, on the engine thread

    def first_token(self, ttft_s: float, prompt_tokens: int, late: bool) -> None:
        self.ttft.observe(ttft_s)
        if late:
            self.late_first_tokens.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc()

    def next_tokens(self, count: int, gap_s: float) -> None:
        for _ in range(count):
            self.itl.observe(gap_s / count)
        self.completion_tokens.inc(count)

    def finished(self, outcome: Finished | Failed) -> None:
        return None  # outcomes are counted by the server, which knows a stop string from a disconnect
