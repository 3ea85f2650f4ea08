"""StatsBook: EWMAs from priors, ring-buffer percentiles, in-flight counts, engine readings and their TTL."""

from __future__ import annotations

import random
import statistics

import pytest

from gateway.live.stats import (
    DEFAULT_ALPHA,
    LiveStats,
    Load,
    Prior,
    StatsBook,
    observations_to_converge,
    percentile,
)

PRIOR = Prior(ttft_ms=200.0, decode_tokens_per_s=50.0, latency_ms=1000.0, error_rate=0.0)


def book(alpha: float = DEFAULT_ALPHA, window: int = 64, **kw: float) -> StatsBook:
    return StatsBook({"a": PRIOR, "b": PRIOR}, alpha=alpha, window=window, **kw)


def stats(b: StatsBook, name: str = "a", now_s: float = 0.0) -> LiveStats:
    return b.snapshot(now_s)[name]


def test_fresh_book_reports_priors_and_no_percentiles() -> None:
    s = stats(book())
    assert (s.ttft_ms, s.decode_tokens_per_s, s.latency_ms, s.error_rate) == (200.0, 50.0, 1000.0, 0.0)
    assert s.latency_p50_ms is None and s.latency_p95_ms is None and s.ttft_p95_ms is None
    assert s.samples == 0 and s.last_update_s is None and s.in_flight == 0
    assert s.queue_depth is None and s.running is None and s.kv_cache_used_frac is None


def test_default_alpha_moves_90_percent_in_eleven_observations() -> None:
    """The number [routing] relies on: prior 1000 ms, real latency 100 ms."""
    n = observations_to_converge(DEFAULT_ALPHA)
    assert n == 11
    b = book()
    target = 100.0
    for i in range(n):
        b.observe_request("a", now_s=float(i), ok=True, latency_ms=target)
        moved = (PRIOR.latency_ms - stats(b).latency_ms) / (PRIOR.latency_ms - target)
        assert (moved >= 0.9) == (i + 1 >= n)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.3, 0.5])
def test_convergence_count_matches_simulation(alpha: float) -> None:
    b = book(alpha=alpha)
    count = 0
    while stats(b).ttft_ms > 200.0 - 0.9 * (200.0 - 20.0):
        b.observe_request("a", now_s=0.0, ok=True, latency_ms=500.0, ttft_ms=20.0)
        count += 1
    assert count == observations_to_converge(alpha)


def test_ewma_converges_on_noisy_data() -> None:
    rng = random.Random(7)
    b = book()
    for i in range(200):
        b.observe_request("a", now_s=i, ok=True, latency_ms=rng.gauss(300.0, 30.0), ttft_ms=rng.gauss(80, 8))
    s = stats(b)
    assert s.latency_ms == pytest.approx(300.0, rel=0.1)
    assert s.ttft_ms == pytest.approx(80.0, rel=0.1)
    assert stats(b, "b").latency_ms == 1000.0  # the other deployment is untouched


def test_decode_rate_counts_tokens_after_the_first() -> None:
    b = book(alpha=1.0)
    # 101 tokens: the first at TTFT, then 100 more over 2 s -> 50 tokens/s
    b.observe_request("a", now_s=0, ok=True, latency_ms=2100.0, ttft_ms=100.0, completion_tokens=101)
    assert stats(b).decode_tokens_per_s == pytest.approx(50.0)
    b.observe_request(
        "a", now_s=1, ok=True, latency_ms=9e9, ttft_ms=100.0, completion_tokens=201, decode_ms=1000
    )
    assert stats(b).decode_tokens_per_s == pytest.approx(200.0)


@pytest.mark.parametrize(
    ("ttft_ms", "completion_tokens", "decode_ms"),
    [(100.0, 1, None), (100.0, 50, 0.0), (100.0, 0, None)],
    ids=["one-token", "zero-decode-time", "no-tokens"],
)
def test_decode_rate_ignores_unusable_samples(
    ttft_ms: float | None, completion_tokens: int, decode_ms: float | None
) -> None:
    b = book(alpha=1.0)
    b.observe_request(
        "a", now_s=0, ok=True, latency_ms=100.0, ttft_ms=ttft_ms, completion_tokens=completion_tokens,
        decode_ms=decode_ms,
    )  # fmt: skip
    assert stats(b).decode_tokens_per_s == PRIOR.decode_tokens_per_s


def test_non_streamed_total_rescales_ttft_and_rate_together() -> None:
    b = book(alpha=1.0)
    # prior: 200 ms TTFT + 100 tokens at 50 tok/s = 2,200 ms predicted; observed twice that
    b.observe_request("a", now_s=0, ok=True, latency_ms=4400.0, completion_tokens=100)
    s = stats(b)
    assert s.ttft_ms == pytest.approx(400.0) and s.decode_tokens_per_s == pytest.approx(25.0)
    assert s.ttft_ms + 100 * 1000 / s.decode_tokens_per_s == pytest.approx(4400.0)


def test_failures_move_error_rate_only() -> None:
    b = book(alpha=0.5)
    b.observe_request("a", now_s=5.0, ok=False, latency_ms=1.0, ttft_ms=1.0, completion_tokens=0)
    s = stats(b)
    assert s.error_rate == 0.5
    assert (s.latency_ms, s.ttft_ms, s.latency_p50_ms) == (1000.0, 200.0, None)
    assert s.samples == 1 and s.last_update_s == 5.0
    b.observe_request("a", now_s=6.0, ok=True, latency_ms=10.0)
    assert stats(b).error_rate == 0.25


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 500])
def test_percentiles_match_statistics_quantiles(n: int) -> None:
    rng = random.Random(n)
    b = book(window=64)
    data = [rng.lognormvariate(5, 1) for _ in range(n)]
    for i, x in enumerate(data):
        b.observe_request("a", now_s=i, ok=True, latency_ms=x, ttft_ms=x / 10)
    recent = data[-64:]
    s = stats(b)
    if len(recent) == 1:
        assert s.latency_p50_ms == s.latency_p95_ms == recent[0]
        return
    q = statistics.quantiles(recent, n=100, method="inclusive")
    assert s.latency_p50_ms == pytest.approx(q[49])
    assert s.latency_p95_ms == pytest.approx(q[94])
    assert s.ttft_p95_ms == pytest.approx(
        statistics.quantiles([x / 10 for x in recent], n=100, method="inclusive")[94]
    )


def test_percentile_helper_edges() -> None:
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([1.0, 2.0], 1.0) == 2.0
    assert percentile([1.0, 2.0], 0.0) == 1.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)


def test_ring_forgets_old_samples() -> None:
    b = book(window=4)
    for x in [1000.0] * 10 + [1.0, 2.0, 3.0, 4.0]:
        b.observe_request("a", now_s=0, ok=True, latency_ms=x)
    assert stats(b).latency_p95_ms == pytest.approx(3.85)


def test_in_flight_counting() -> None:
    b = book()
    b.request_started("a")
    b.request_started("a")
    b.request_started("b")
    assert (stats(b, "a").in_flight, stats(b, "b").in_flight) == (2, 1)
    b.request_finished("a")
    assert stats(b).in_flight == 1
    with pytest.raises(RuntimeError), b.in_flight("a"):
        assert stats(b).in_flight == 2
        raise RuntimeError("backend blew up")
    assert stats(b).in_flight == 1
    b.request_finished("a")
    b.request_finished("a")  # one too many: clamps at zero
    assert stats(b).in_flight == 0


def test_pending_prompt_tokens_count_until_the_first_token_or_the_end() -> None:
    b = book()
    b.request_started("a", 300)
    b.request_started("a", 500)
    b.request_started("b", 40)
    assert (stats(b, "a").pending_prompt_tokens, stats(b, "b").pending_prompt_tokens) == (800, 40)
    b.prefill_done("a", 300)  # its first token came; still in flight
    assert (stats(b).pending_prompt_tokens, stats(b).in_flight) == (500, 2)
    b.request_finished("a")  # the one already prefilled gives back nothing more
    b.request_finished("a", 500)  # ended before its first token (a failure, a whole answer)
    assert (stats(b).pending_prompt_tokens, stats(b).in_flight) == (0, 0)
    b.prefill_done("b", 100)  # more than it holds: clamps at zero
    assert stats(b, "b").pending_prompt_tokens == 0


def test_pending_prompts_context_counts_from_the_tokens_expected_cached() -> None:
    """Beside the pending tokens, their attention's share (routing.fleet.prompt_context): 300 tokens after
    1,000 cached ones count 300 x 1,150; given back with the tokens, to exactly zero. The whole prompts,
    cached tokens included, stay in flight until each request ends (`in_flight_context`)."""
    b = book()
    b.request_started("a", 300, 1000)
    b.request_started("a", 500)
    assert stats(b).pending_prompt_context == 300 * 1150 + 500 * 250
    assert b.load_of("a") == Load(2, 800, 300 * 1150 + 500 * 250, 1800)
    b.prefill_done("a", 300, 1000)
    assert (stats(b).pending_prompt_context, stats(b).in_flight_context) == (500 * 250, 1800)
    b.request_finished("a", 0, 1000, 1300)  # prefilled before: its whole prompt leaves
    b.request_finished("a", 500, 0, 500)  # ended before its first token
    assert b.load_of("a") == Load() and b.load_of("never") == Load()
    b.request_finished("a", 10, 10, 10)  # one too many: clamps at zero
    assert (stats(b).pending_prompt_context, stats(b).in_flight_context) == (0.0, 0)


def test_engine_reading_is_reported_until_ttl() -> None:
    b = book(engine_ttl_s=5.0)
    b.observe_engine("a", now_s=100.0, queue_depth=3, kv_cache_used_frac=0.4, running=8)
    s = stats(b, now_s=105.0)
    assert (s.queue_depth, s.running, s.kv_cache_used_frac, s.last_update_s) == (3, 8, 0.4, 100.0)
    s = stats(b, now_s=105.1)
    assert (s.queue_depth, s.running, s.kv_cache_used_frac) == (None, None, None)
    assert stats(b, now_s=104.0).queue_depth == 3  # asked about an earlier instant: still fresh then
    b.observe_engine("a", now_s=106.0, queue_depth=0, kv_cache_used_frac=None, running=1)
    assert stats(b, now_s=106.0).queue_depth == 0


def test_snapshot_is_frozen() -> None:
    b = book()
    snap = b.snapshot(0.0)
    with pytest.raises(TypeError):
        snap["a"] = snap["b"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap["a"].ttft_ms = 1.0  # type: ignore[misc]
    b.observe_request("a", now_s=1, ok=True, latency_ms=1.0)
    assert snap["a"].latency_ms == 1000.0  # a snapshot does not change under later observations
    assert b.snapshot(0.0)["a"].latency_ms < 1000.0  # the next one sees them
    assert b.snapshot(0.0)["b"] is snap["b"]  # an unchanged deployment's stats are reused


def test_unknown_deployment_and_bad_settings_say_what_to_fix() -> None:
    with pytest.raises(KeyError, match="`zzz`; known: a, b"):
        book().request_started("zzz")
    with pytest.raises(ValueError, match="alpha"):
        StatsBook({}, alpha=0.0)
    with pytest.raises(ValueError, match="window"):
        StatsBook({}, window=0)


@pytest.mark.parametrize(
    "bad",
    [{"decode_tokens_per_s": 0.0}, {"ttft_ms": -1.0}, {"latency_ms": -1.0}, {"error_rate": 1.5}],
)
def test_prior_refuses_impossible_values(bad: dict[str, float]) -> None:
    fields = {"ttft_ms": 1.0, "decode_tokens_per_s": 1.0, "latency_ms": 1.0} | bad
    with pytest.raises(ValueError):
        Prior(**fields)
