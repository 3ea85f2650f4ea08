"""Live per-deployment statistics for routing: EWMAs from configured priors, recent percentiles, load.

Every observation is O(1): EWMAs update in place and latency/TTFT samples go into fixed-size rings whose
percentiles are sorted on demand (and cached until the next sample). Time is always passed in. `snapshot`
returns frozen `LiveStats`; engine readings older than `engine_ttl_s` are left out of it (None), so a dead
metrics endpoint never looks like an idle engine. Failed requests move only the error rate: a fast 500 must
not make a backend look fast. `evidence` says how much recent observation stands behind each EWMA (counts
decayed with `recent_tau_s`); `merge_stats` weighs several replicas' numbers by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from routing.fleet import lateness, prompt_context, tail_factor

DEFAULT_ALPHA = 0.2  # moves 90% of the way to a new steady value in 11 observations
DEFAULT_WINDOW = 256
DEFAULT_ENGINE_TTL_S = 10.0
DEFAULT_RECENT_TAU_S = 60.0  # an observation this old counts 1/e as much as a new one
STALE_WEIGHT = 1e-6  # in merge_stats: evidence decayed to ~0 still outweighs none (a replica on its priors)


@dataclass(frozen=True, slots=True)
class Prior:
    """What we believe about a deployment before it has served anything (from config or a benchmark)."""

    ttft_ms: float
    decode_tokens_per_s: float
    latency_ms: float
    error_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.decode_tokens_per_s <= 0 or self.ttft_ms < 0 or self.latency_ms < 0:
            raise ValueError(
                "prior needs decode_tokens_per_s > 0, ttft_ms >= 0 and latency_ms >= 0; got "
                f"{self.decode_tokens_per_s}, {self.ttft_ms}, {self.latency_ms}"
            )
        if not 0 <= self.error_rate <= 1:
            raise ValueError(f"prior error_rate must be in [0, 1], got {self.error_rate}")


@dataclass(frozen=True, slots=True)
class LiveStats:
    """One deployment at one instant. EWMA fields always hold a number (the prior until evidence arrives);
    percentiles are None until a successful sample exists; engine fields are None when no fresh reading."""

    ttft_ms: float
    decode_tokens_per_s: float
    error_rate: float
    latency_ms: float
    in_flight: int
    queue_depth: int | None
    running: int | None
    kv_cache_used_frac: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p95_ms: float | None
    samples: int  # request observations (ok and failed) since start
    last_update_s: float | None  # latest request observation or engine reading
    engine_at_s: float | None = None  # when the engine reading above was taken
    pending_prompt_tokens: int = 0  # prompt tokens of in-flight requests without a first token (prefill)
    pending_prompt_context: float = 0.0  # their attention's share (`prompt_context`; routing.fleet.predict)
    in_flight_context: int = 0  # prompt tokens of in-flight requests, cached ones included (their decoding)
    ttft_tail_factor: float = 1.0  # routing.fleet.tail_factor of measured / predicted TTFT; 1 until known


class Load(NamedTuple):
    """What this replica has on a deployment (`StatsBook.load_of`), as `LiveStats` names it."""

    in_flight: int = 0
    pending_prompt_tokens: int = 0
    pending_prompt_context: float = 0.0
    in_flight_context: int = 0


NO_LOAD = Load()


@dataclass(frozen=True, slots=True)
class Evidence:
    """Observations behind one deployment's EWMAs, each weighted exp(-age / recent_tau_s): about the count
    of the last tau seconds. `recent_ok` (successes only) backs latency, TTFT, decode rate and percentiles;
    `recent` (all) backs the error rate. Zero when the numbers are still the priors."""

    recent: float
    recent_ok: float


NO_EVIDENCE = Evidence(0.0, 0.0)


def observations_to_converge(alpha: float, fraction: float = 0.9) -> int:
    """How many observations an EWMA needs to move `fraction` of the way from its start to a new level."""
    if not 0 < alpha <= 1 or not 0 < fraction < 1:
        raise ValueError(f"need 0 < alpha <= 1 and 0 < fraction < 1, got alpha={alpha}, fraction={fraction}")
    if alpha == 1:
        return 1
    return math.ceil(math.log(1 - fraction) / math.log(1 - alpha))


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks: `statistics.quantiles(method="inclusive")` at p."""
    position = (len(sorted_values) - 1) * p
    lo = int(position)
    if lo + 1 >= len(sorted_values):
        return sorted_values[-1]
    return sorted_values[lo] + (position - lo) * (sorted_values[lo + 1] - sorted_values[lo])


class _Ring:
    """The last `size` samples. `push` is O(1); `sorted` sorts a copy once per new sample, on demand."""

    __slots__ = ("_values", "_next", "_pushes", "_sorted", "_sorted_at")

    def __init__(self, size: int) -> None:
        self._values: list[float] = [0.0] * size
        self._next = 0
        self._pushes = 0
        self._sorted: list[float] = []
        self._sorted_at = 0

    def push(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % len(self._values)
        self._pushes += 1

    def sorted(self) -> list[float]:
        if self._sorted_at != self._pushes:
            self._sorted = sorted(self._values[: min(self._pushes, len(self._values))])
            self._sorted_at = self._pushes
        return self._sorted

    def quantile(self, p: float) -> float | None:
        values = self.sorted()
        return percentile(values, p) if values else None


class _Engine:
    __slots__ = ("queue_depth", "running", "kv_cache_used_frac", "at_s")

    def __init__(
        self, queue_depth: int | None, running: int | None, kv_cache_used_frac: float | None, at_s: float
    ) -> None:
        self.queue_depth = queue_depth
        self.running = running
        self.kv_cache_used_frac = kv_cache_used_frac
        self.at_s = at_s


class _Live:
    """Mutable state of one deployment; never leaves this module."""

    __slots__ = (
        "ttft_ms",
        "decode_tokens_per_s",
        "error_rate",
        "latency_ms",
        "in_flight",
        "pending_prompt_tokens",
        "pending_prompt_context",
        "in_flight_context",
        "samples",
        "last_update_s",
        "recent",
        "recent_ok",
        "recent_at_s",
        "latencies",
        "ttfts",
        "lateness",
        "kv_written",
        "engine",
        "cached",
        "cached_from_s",
        "cached_until_s",
    )

    def __init__(self, prior: Prior, window: int) -> None:
        self.ttft_ms = prior.ttft_ms
        self.decode_tokens_per_s = prior.decode_tokens_per_s
        self.error_rate = prior.error_rate
        self.latency_ms = prior.latency_ms
        self.in_flight = 0
        self.pending_prompt_tokens = 0
        self.pending_prompt_context = 0.0
        self.in_flight_context = 0
        self.samples = 0
        self.last_update_s: float | None = None
        self.recent = 0.0  # decayed observation counts as of recent_at_s (see Evidence)
        self.recent_ok = 0.0
        self.recent_at_s = 0.0
        self.latencies = _Ring(window)
        self.ttfts = _Ring(window)
        self.lateness = _Ring(window)  # routing.fleet.lateness of requests routing predicted
        self.kv_written = 0  # prompt tokens sent to be computed and tokens generated here, since start
        self.engine: _Engine | None = None
        self.cached: LiveStats | None = None  # valid for now_s in [cached_from_s, cached_until_s]
        self.cached_from_s = 0.0
        self.cached_until_s = 0.0


class StatsBook:
    """Live statistics for a fixed set of deployments (the keys of `priors`). Not thread-safe: call it from
    the event loop only."""

    def __init__(
        self,
        priors: Mapping[str, Prior],
        *,
        alpha: float = DEFAULT_ALPHA,
        window: int = DEFAULT_WINDOW,
        engine_ttl_s: float = DEFAULT_ENGINE_TTL_S,
        recent_tau_s: float = DEFAULT_RECENT_TAU_S,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha} (routing.alpha)")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window} (routing.window)")
        if recent_tau_s <= 0:
            raise ValueError(f"recent_tau_s must be > 0, got {recent_tau_s}")
        self._alpha = alpha
        self._window = window
        self.engine_ttl_s = engine_ttl_s
        self._tau_s = recent_tau_s
        self._live = {name: _Live(prior, window) for name, prior in priors.items()}
        # Bumped whenever an in-flight count or pending prompt count moves: a cached routing snapshot
        # compares it to know whether its load figures are still this replica's own (gateway/live/state.py).
        self.load_version = 0

    def ensure(self, deployment_id: str, prior: Prior) -> None:
        """Track a deployment that appeared after start (an edge node); a known one is left as it is."""
        if deployment_id not in self._live:
            self._live[deployment_id] = _Live(prior, self._window)

    def forget(self, deployment_id: str) -> None:
        """Stop tracking a deployment that is gone (nothing may be in flight on it)."""
        self._live.pop(deployment_id, None)

    def in_flight_of(self, deployment_id: str) -> int:
        live = self._live.get(deployment_id)
        return 0 if live is None else live.in_flight

    def kv_written_of(self, deployment_id: str) -> int:
        """KV tokens this replica has had written on `deployment_id` since start: the prompt tokens it
        counted as pending prefill there plus the tokens generated there (routing.fleet.holds_prefix)."""
        live = self._live.get(deployment_id)
        return 0 if live is None else live.kv_written

    def load_of(self, deployment_id: str) -> Load:
        """The in-flight requests this replica has on `deployment_id`, their prompts pending prefill and
        their context."""
        live = self._live.get(deployment_id)
        if live is None:
            return NO_LOAD
        return Load(
            live.in_flight, live.pending_prompt_tokens, live.pending_prompt_context, live.in_flight_context
        )

    def _get(self, deployment_id: str) -> _Live:
        """The state to change; drops its cached LiveStats (every caller is about to change it)."""
        try:
            live = self._live[deployment_id]
        except KeyError:
            known = ", ".join(sorted(self._live)) or "none"
            raise KeyError(f"no statistics for deployment `{deployment_id}`; known: {known}") from None
        live.cached = None
        return live

    def observe_request(
        self,
        deployment_id: str,
        *,
        now_s: float,
        ok: bool,
        latency_ms: float,
        ttft_ms: float | None = None,
        completion_tokens: int = 0,
        decode_ms: float | None = None,
        predicted_ttft_ms: float = 0.0,
    ) -> None:
        """One finished request. For streams pass `ttft_ms`; `decode_ms` (time after the first token)
        defaults to `latency_ms - ttft_ms`. Decode rate counts the tokens after the first one, since the
        first token's time is TTFT: (completion_tokens - 1) / decode time. `predicted_ttft_ms` (> 0: what
        routing predicted for it here) adds `routing.fleet.lateness` (measured against predicted) to the
        samples behind `ttft_tail_factor`."""
        live = self._get(deployment_id)
        a = self._alpha
        live.samples += 1
        live.last_update_s = now_s
        decay = self._decay(live, now_s)
        live.recent = live.recent * decay + 1.0
        live.recent_ok = live.recent_ok * decay + (1.0 if ok else 0.0)
        live.recent_at_s = max(now_s, live.recent_at_s)
        live.error_rate += a * ((0.0 if ok else 1.0) - live.error_rate)
        if not ok:
            return
        live.kv_written += completion_tokens
        live.latency_ms += a * (latency_ms - live.latency_ms)
        live.latencies.push(latency_ms)
        if ttft_ms is None:
            self._rescale(live, latency_ms, completion_tokens)
            return
        live.ttft_ms += a * (ttft_ms - live.ttft_ms)
        live.ttfts.push(ttft_ms)
        if predicted_ttft_ms > 0:
            live.lateness.push(lateness(ttft_ms, predicted_ttft_ms))
        if decode_ms is None:
            decode_ms = latency_ms - ttft_ms
        if completion_tokens >= 2 and decode_ms > 0:
            rate = (completion_tokens - 1) * 1000.0 / decode_ms
            live.decode_tokens_per_s += a * (rate - live.decode_tokens_per_s)

    def _decay(self, live: _Live, now_s: float) -> float:
        return math.exp(-max(0.0, now_s - live.recent_at_s) / self._tau_s)

    def evidence(self, now_s: float) -> Mapping[str, Evidence]:
        """Deployment id -> its decayed observation counts at `now_s` (not cached: they change with time)."""
        out: dict[str, Evidence] = {}
        for name, live in self._live.items():
            if live.recent == 0.0:
                out[name] = NO_EVIDENCE
                continue
            decay = self._decay(live, now_s)
            out[name] = Evidence(live.recent * decay, live.recent_ok * decay)
        return MappingProxyType(out)

    def _rescale(self, live: _Live, latency_ms: float, completion_tokens: int) -> None:
        """A whole (non-streamed) answer shows only the total: scale TTFT and decode rate together so the
        predicted total (TTFT + tokens / rate) moves toward the observed one, keeping their split."""
        if completion_tokens < 1 or latency_ms <= 0:
            return
        predicted_ms = live.ttft_ms + completion_tokens * 1000.0 / live.decode_tokens_per_s
        ratio = min(max(latency_ms / predicted_ms, 0.05), 20.0)
        a = self._alpha
        live.ttft_ms += a * (live.ttft_ms * ratio - live.ttft_ms)
        live.decode_tokens_per_s += a * (live.decode_tokens_per_s / ratio - live.decode_tokens_per_s)

    def request_started(self, deployment_id: str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """A request is in flight, its `prompt_tokens` (those after the `cached_tokens` it expects cached)
        pending prefill until `prefill_done` or the end, and the whole prompt in flight until the end."""
        live = self._get(deployment_id)
        live.in_flight += 1
        live.in_flight_context += prompt_tokens + cached_tokens
        live.pending_prompt_tokens += prompt_tokens
        live.pending_prompt_context += prompt_context(prompt_tokens, cached_tokens)
        live.kv_written += prompt_tokens
        self.load_version += 1

    def prefill_done(self, deployment_id: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        """Its first token came: its prompt no longer stands ahead of new requests. Never below zero."""
        self._unpend(self._get(deployment_id), prompt_tokens, cached_tokens)
        self.load_version += 1

    def request_finished(
        self,
        deployment_id: str,
        pending_prompt_tokens: int = 0,
        cached_tokens: int = 0,
        prompt_tokens: int = 0,
    ) -> None:
        """Pairs with `request_started` (`pending_prompt_tokens`: as it started, if no `prefill_done` came;
        `cached_tokens` as it started; `prompt_tokens`: the whole prompt, cached ones included). Never goes
        below zero, so a double call cannot hide real load."""
        live = self._get(deployment_id)
        live.in_flight = max(0, live.in_flight - 1)
        live.in_flight_context = max(0, live.in_flight_context - prompt_tokens) if live.in_flight else 0
        self._unpend(live, pending_prompt_tokens, cached_tokens)
        self.load_version += 1

    @staticmethod
    def _unpend(live: _Live, prompt_tokens: int, cached_tokens: int) -> None:
        live.pending_prompt_tokens = max(0, live.pending_prompt_tokens - prompt_tokens)
        context = live.pending_prompt_context - prompt_context(prompt_tokens, cached_tokens)
        live.pending_prompt_context = max(0.0, context) if live.pending_prompt_tokens else 0.0

    @contextmanager
    def in_flight(self, deployment_id: str) -> Iterator[None]:
        """`request_started` on entry and `request_finished` on exit, however the block ends."""
        self.request_started(deployment_id)
        try:
            yield
        finally:
            self.request_finished(deployment_id)

    def observe_engine(
        self,
        deployment_id: str,
        *,
        now_s: float,
        queue_depth: int | None,
        kv_cache_used_frac: float | None,
        running: int | None,
    ) -> None:
        """A reading from the engine's /metrics; replaces the previous one and expires after the TTL."""
        live = self._get(deployment_id)
        live.engine = _Engine(queue_depth, running, kv_cache_used_frac, now_s)
        if live.last_update_s is None or now_s > live.last_update_s:
            live.last_update_s = now_s

    def snapshot(self, now_s: float) -> Mapping[str, LiveStats]:
        return MappingProxyType({name: self._stats(live, now_s) for name, live in self._live.items()})

    def _stats(self, live: _Live, now_s: float) -> LiveStats:
        """Cached per deployment until it changes or its engine reading expires: a snapshot of many idle
        deployments costs one dict copy, not a LiveStats and three percentiles each."""
        if live.cached is not None and live.cached_from_s <= now_s <= live.cached_until_s:
            return live.cached
        engine = live.engine
        until_s = math.inf
        if engine is not None:
            if now_s - engine.at_s > self.engine_ttl_s:
                engine = None
            else:
                until_s = engine.at_s + self.engine_ttl_s
        live.cached = self._build(live, engine)
        live.cached_from_s, live.cached_until_s = now_s, until_s
        return live.cached

    @staticmethod
    def _build(live: _Live, engine: _Engine | None) -> LiveStats:
        return LiveStats(
            ttft_ms=live.ttft_ms,
            decode_tokens_per_s=live.decode_tokens_per_s,
            error_rate=live.error_rate,
            latency_ms=live.latency_ms,
            in_flight=live.in_flight,
            queue_depth=engine.queue_depth if engine else None,
            running=engine.running if engine else None,
            kv_cache_used_frac=engine.kv_cache_used_frac if engine else None,
            latency_p50_ms=live.latencies.quantile(0.50),
            latency_p95_ms=live.latencies.quantile(0.95),
            ttft_p95_ms=live.ttfts.quantile(0.95),
            samples=live.samples,
            last_update_s=live.last_update_s,
            engine_at_s=engine.at_s if engine else None,
            pending_prompt_tokens=live.pending_prompt_tokens,
            pending_prompt_context=live.pending_prompt_context,
            in_flight_context=live.in_flight_context,
            ttft_tail_factor=tail_factor(live.lateness.sorted()),
        )


def _mean(rows: Iterable[tuple[float | None, float]]) -> float | None:
    """Weighted mean of (value, weight) pairs, skipping missing values; None when nothing is left."""
    pairs = [(value, weight) for value, weight in rows if value is not None]
    total = sum(weight for _, weight in pairs)
    return sum(value * weight for value, weight in pairs) / total if total > 0 else None


def _engine_at(stats: LiveStats) -> float:
    return stats.engine_at_s if stats.engine_at_s is not None else -math.inf


def merge_stats(
    rows: Sequence[tuple[LiveStats, Evidence]], *, now_s: float, engine_ttl_s: float
) -> LiveStats:
    """One deployment as several replicas together see it; `rows[0]` is this replica's, whose numbers (its
    priors) stand where no replica has evidence. Pure: no row is changed, so nothing is counted twice.

    EWMAs and percentiles are averaged, weighted by each replica's `Evidence` (observations decayed with
    time constant tau, about "the count of the last tau seconds"): a replica that served much, lately, counts
    most; one busy an hour ago counts little. A count since start would let an idle replica's old numbers
    outvote fresh ones, and a capped count would weigh every busy replica alike however stale. Latency,
    TTFT, decode rate and percentiles use successes only (a failure moves only the error rate); a replica
    still on its priors has weight 0, so it never pulls real evidence back toward them. In-flight counts
    and pending prompt tokens add up; the freshest engine reading (queue depth, KV use) within
    `engine_ttl_s` wins; the TTFT tail factor is the largest any replica measured.
    """
    local = rows[0][0]
    if len(rows) == 1:
        return local
    seen = [(s, e.recent + STALE_WEIGHT) for s, e in rows if s.samples > 0]
    ok = [(s, e.recent_ok + STALE_WEIGHT) for s, e in rows if s.latency_p50_ms is not None]
    fresh = [s for s, _ in rows if s.engine_at_s is not None and now_s - s.engine_at_s <= engine_ttl_s]
    engine = max(fresh, key=_engine_at) if fresh else None
    updates = [s.last_update_s for s, _ in rows if s.last_update_s is not None]

    def mean(values: Iterable[tuple[float | None, float]], fallback: float) -> float:
        found = _mean(values)
        return fallback if found is None else found

    return LiveStats(
        ttft_ms=mean(((s.ttft_ms, w) for s, w in ok), local.ttft_ms),
        decode_tokens_per_s=mean(((s.decode_tokens_per_s, w) for s, w in ok), local.decode_tokens_per_s),
        error_rate=mean(((s.error_rate, w) for s, w in seen), local.error_rate),
        latency_ms=mean(((s.latency_ms, w) for s, w in ok), local.latency_ms),
        in_flight=sum(s.in_flight for s, _ in rows),
        queue_depth=engine.queue_depth if engine else None,
        running=engine.running if engine else None,
        kv_cache_used_frac=engine.kv_cache_used_frac if engine else None,
        latency_p50_ms=_mean((s.latency_p50_ms, w) for s, w in ok),
        latency_p95_ms=_mean((s.latency_p95_ms, w) for s, w in ok),
        ttft_p95_ms=_mean((s.ttft_p95_ms, w) for s, w in ok),
        samples=sum(s.samples for s, _ in rows),
        last_update_s=max(updates) if updates else None,
        engine_at_s=engine.engine_at_s if engine else None,
        pending_prompt_tokens=sum(s.pending_prompt_tokens for s, _ in rows),
        pending_prompt_context=sum(s.pending_prompt_context for s, _ in rows),
        in_flight_context=sum(s.in_flight_context for s, _ in rows),
        ttft_tail_factor=max(s.ttft_tail_factor for s, _ in rows),
    )
