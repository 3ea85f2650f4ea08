"""The pure parts of sharing routing state between replicas: merging stats, picking the trip to follow, the
wire format, decayed evidence, and the breaker's follow/release moves. No I/O."""

from __future__ import annotations

import dataclasses
import math

import orjson
import pytest

from backends.base import BackendKind
from gateway.config import parse_config
from gateway.live import sync as shared_routing
from gateway.live.breaker import BreakerState, BreakerView, CircuitBreaker
from gateway.live.state import RoutingState
from gateway.live.stats import NO_EVIDENCE, Evidence, LiveStats, Prior, StatsBook, merge_stats
from gateway.live.sync import (
    Claim,
    RemoteStats,
    SharedView,
    by_deployment,
    decode_summary,
    encode_summary,
    leading_claims,
)
from routing.decision import FREE
from routing.privacy import PrivacyTier
from routing.snapshot import DeploymentSpec

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
PRIORS = LiveStats(
    ttft_ms=500.0, decode_tokens_per_s=50.0, error_rate=0.0, latency_ms=2000.0, in_flight=0, queue_depth=None,
    running=None, kv_cache_used_frac=None, latency_p50_ms=None, latency_p95_ms=None, ttft_p95_ms=None,
    samples=0, last_update_s=None,
)  # fmt: skip


def seen(ttft_ms: float, *, samples: int = 10, **kw: float | int | None) -> LiveStats:
    """Stats with successful observations behind them (percentiles set), TTFT `ttft_ms`."""
    base = {"latency_ms": ttft_ms * 5, "latency_p50_ms": ttft_ms * 5, "latency_p95_ms": ttft_ms * 9}
    return dataclasses.replace(
        PRIORS, ttft_ms=ttft_ms, ttft_p95_ms=ttft_ms * 2, samples=samples, last_update_s=1.0, **(base | kw)
    )


def remote(stats: LiveStats, recent: float, recent_ok: float | None = None) -> RemoteStats:
    return RemoteStats(stats, Evidence(recent, recent if recent_ok is None else recent_ok))


def merge(local: LiveStats, local_evidence: Evidence, *rows: RemoteStats, now_s: float = 10.0) -> LiveStats:
    return merge_stats(
        [(local, local_evidence), *((r.stats, r.evidence) for r in rows)], now_s=now_s, engine_ttl_s=10.0
    )


# ---- merge_stats ------------------------------------------------------------------------------------------


def test_without_remote_rows_the_local_stats_are_returned_as_they_are() -> None:
    local = seen(100.0)
    assert merge(local, Evidence(3.0, 3.0)) is local


def test_ewmas_and_percentiles_are_weighted_by_recent_evidence() -> None:
    merged = merge(seen(100.0), Evidence(3.0, 3.0), remote(seen(200.0), 1.0))
    assert merged.ttft_ms == pytest.approx(125.0, rel=1e-5)
    assert merged.latency_ms == pytest.approx(625.0, rel=1e-5)
    assert merged.latency_p50_ms == pytest.approx(625.0, rel=1e-5)
    assert merged.latency_p95_ms == pytest.approx(1125.0, rel=1e-5)
    assert merged.ttft_p95_ms == pytest.approx(250.0, rel=1e-5)
    assert merged.samples == 20


def test_a_replica_on_its_priors_does_not_pull_evidence_back_toward_them() -> None:
    from_remote = merge(PRIORS, NO_EVIDENCE, remote(seen(100.0, error_rate=0.2), 4.0))
    assert (from_remote.ttft_ms, from_remote.error_rate, from_remote.latency_p50_ms) == (100.0, 0.2, 500.0)
    local = seen(100.0)
    from_local = merge(local, Evidence(4.0, 4.0), remote(PRIORS, 0.0), remote(PRIORS, 0.0))
    assert (from_local.ttft_ms, from_local.latency_ms, from_local.samples) == (100.0, 500.0, 10)


def test_with_no_evidence_anywhere_the_priors_stand() -> None:
    merged = merge(PRIORS, NO_EVIDENCE, remote(PRIORS, 0.0))
    assert merged == PRIORS


def test_failures_weigh_the_error_rate_but_not_latency() -> None:
    """Remote: 9 recent observations, all failures (its latency numbers are old); local: 1 recent success."""
    failing = seen(900.0, error_rate=0.9)
    merged = merge(seen(100.0, error_rate=0.0), Evidence(1.0, 1.0), remote(failing, 9.0, recent_ok=0.0))
    assert merged.error_rate == pytest.approx(0.81, rel=1e-4)
    assert merged.ttft_ms == pytest.approx(100.0, rel=1e-4)


def test_evidence_decayed_to_nothing_still_beats_none() -> None:
    merged = merge(PRIORS, NO_EVIDENCE, remote(seen(100.0), 0.0), remote(seen(300.0), 0.0))
    assert merged.ttft_ms == pytest.approx(200.0)  # equally stale: equal say


def test_in_flight_adds_up_and_the_latest_update_wins() -> None:
    local = dataclasses.replace(PRIORS, in_flight=2, last_update_s=4.0)
    merged = merge(
        local,
        NO_EVIDENCE,
        remote(dataclasses.replace(PRIORS, in_flight=3, last_update_s=7.0), 0.0),
        remote(dataclasses.replace(PRIORS, in_flight=1), 0.0),
    )
    assert (merged.in_flight, merged.last_update_s) == (6, 7.0)


def engine(at_s: float, queue_depth: int) -> LiveStats:
    return dataclasses.replace(
        PRIORS, engine_at_s=at_s, queue_depth=queue_depth, running=queue_depth, kv_cache_used_frac=at_s / 100
    )


def test_the_freshest_engine_reading_within_its_ttl_wins() -> None:
    merged = merge(engine(5.0, 1), NO_EVIDENCE, remote(engine(8.0, 7), 0.0), remote(engine(6.0, 3), 0.0))
    assert (merged.queue_depth, merged.running, merged.kv_cache_used_frac, merged.engine_at_s) == (
        7,
        7,
        0.08,
        8.0,
    )
    later = merge(engine(5.0, 1), NO_EVIDENCE, remote(engine(8.0, 7), 0.0), now_s=18.5)
    assert (later.queue_depth, later.engine_at_s) == (None, None)  # 13.5 s and 10.5 s old: both expired
    assert merge(PRIORS, NO_EVIDENCE, remote(engine(9.0, 4), 0.0), now_s=18.5).queue_depth == 4


# ---- claims, views, wire format ---------------------------------------------------------------------------


def claimed(replica_id: str, open_until_s: float, hold_until_s: float) -> RemoteStats:
    return RemoteStats(
        PRIORS, NO_EVIDENCE, Claim(replica_id, open_until_s * 1000, open_until_s, hold_until_s)
    )


def test_the_longest_live_claim_leads_and_ties_go_to_the_lowest_id() -> None:
    replicas = {
        "c": {"m@x": claimed("c", 20.0, 25.0), "m@y": claimed("c", 10.0, 15.0)},
        "b": {"m@x": claimed("b", 30.0, 35.0), "m@y": claimed("b", 10.0, 15.0)},
        "a": {"m@x": RemoteStats(PRIORS, NO_EVIDENCE), "m@z": claimed("a", 1.0, 4.0)},
    }
    leading = leading_claims(replicas, now_s=5.0)
    assert {dep: c.replica_id for dep, c in leading.items()} == {"m@x": "b", "m@y": "b"}  # m@z: hold passed


def test_a_view_merges_until_it_goes_stale() -> None:
    view = SharedView({"d": (remote(dataclasses.replace(PRIORS, in_flight=2), 0.0),)}, 10.0, 10.0)
    local = {"d": dataclasses.replace(PRIORS, in_flight=1), "e": PRIORS}
    assert view.merge(local, {}, 10.0)["d"].in_flight == 3
    assert view.merge(local, {}, 10.0)["e"] == PRIORS
    assert view.merge(local, {}, 10.1) is local


def test_summaries_round_trip_onto_the_readers_clock() -> None:
    """Writer's monotonic clock = wall - 1000; reader's = wall - 4000."""
    stats = {
        "d": dataclasses.replace(seen(100.0, in_flight=2), engine_at_s=50.0, queue_depth=3),
        "idle": PRIORS,
    }
    raw = encode_summary(stats, {"d": Evidence(2.5, 2.0)}, {"d": (1_060_000.0, 1_062_000.0)}, offset_s=1000.0)
    decoded = decode_summary(raw, replica_id="w", offset_s=4000.0)
    assert decoded is not None and set(decoded) == {"d"}  # nothing to tell about "idle"
    got = decoded["d"]
    assert got.evidence == Evidence(2.5, 2.0)
    assert got.claim == Claim("w", 1_060_000.0, 1060.0 - 4000.0, 1062.0 - 4000.0)
    assert got.stats == dataclasses.replace(stats["d"], last_update_s=1.0 - 3000.0, engine_at_s=50.0 - 3000.0)


def test_the_wire_format_carries_every_live_stats_field() -> None:
    groups = (
        shared_routing._NUMBERS, shared_routing._MAYBE_NUMBERS, shared_routing._COUNTS,
        shared_routing._MAYBE_COUNTS, shared_routing._TIMES, shared_routing._NUMBERS_SINCE_V1,
        shared_routing._NUMBERS_ZERO_WHEN_ABSENT, shared_routing._COUNTS_ZERO_WHEN_ABSENT,
    )  # fmt: skip
    assert sorted(f for g in groups for f in g) == sorted(f.name for f in dataclasses.fields(LiveStats))


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b'{"v": 99, "deps": {}}', b'{"v": 1, "deps": {"d": {"ttft": 1}}}']
)
def test_unreadable_summaries_are_ignored(raw: bytes) -> None:
    assert decode_summary(raw, replica_id="w", offset_s=0.0) is None


def test_rows_are_grouped_by_deployment_in_replica_order() -> None:
    a, b = remote(seen(1.0), 1.0), remote(seen(2.0), 1.0)
    assert by_deployment({"b": {"d": b}, "a": {"d": a, "e": a}}) == {"d": (a, b), "e": (a,)}


# ---- evidence in the StatsBook ----------------------------------------------------------------------------


def test_evidence_decays_with_tau_and_counts_successes_apart() -> None:
    book = StatsBook({"d": Prior(100.0, 50.0, 500.0), "e": Prior(100.0, 50.0, 500.0)}, recent_tau_s=10.0)
    assert book.evidence(0.0)["d"] == NO_EVIDENCE
    book.observe_request("d", now_s=0.0, ok=True, latency_ms=100.0)
    book.observe_request("d", now_s=0.0, ok=False, latency_ms=100.0)
    assert book.evidence(0.0)["d"] == Evidence(2.0, 1.0)
    later = book.evidence(10.0)["d"]
    assert later.recent == pytest.approx(2 / math.e) and later.recent_ok == pytest.approx(1 / math.e)
    book.observe_request("d", now_s=10.0, ok=True, latency_ms=100.0)
    assert book.evidence(10.0)["d"].recent == pytest.approx(2 / math.e + 1)
    assert book.evidence(10.0)["e"] == NO_EVIDENCE
    with pytest.raises(ValueError, match="recent_tau_s"):
        StatsBook({}, recent_tau_s=0.0)


def test_engine_reading_time_is_reported() -> None:
    book = StatsBook({"d": Prior(100.0, 50.0, 500.0)}, engine_ttl_s=5.0)
    book.observe_engine("d", now_s=3.0, queue_depth=1, kv_cache_used_frac=None, running=None)
    assert book.snapshot(4.0)["d"].engine_at_s == 3.0
    assert book.snapshot(9.0)["d"].engine_at_s is None


# ---- breakers following another replica -------------------------------------------------------------------


def breaker() -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=2, window_s=10.0, open_s=5.0, half_open_probes=1)


def test_a_forced_breaker_stays_open_then_holds_its_probe_then_probes_itself() -> None:
    b = breaker()
    assert b.force_open(10.0, hold_until_s=12.0, now_s=1.0)
    view = b.view(1.0)
    assert (view.state, view.open_until_s, view.shared) == (OPEN, 10.0, True)
    assert not b.allow(9.9) and b.own_trip(9.9) is None  # not ours: never published as our trip
    assert b.state(10.0) is HALF_OPEN and b.view(10.0).probes_available == 0
    assert not b.allow(11.9)  # the tripping replica probes meanwhile
    b.record_success(11.0)  # a request from before: decides nothing
    b.record_failure(11.0)
    assert b.state(11.0) is HALF_OPEN
    assert b.allow(12.0) and not b.allow(12.0)  # hold over: one probe of our own
    b.record_success(12.5)
    assert b.view(12.5) == BreakerView(CLOSED, 0, None, 0, shared=False)


def test_release_closes_only_a_followed_trip() -> None:
    b = breaker()
    b.force_open(10.0, hold_until_s=12.0, now_s=1.0)
    assert b.release_forced(2.0) and b.state(2.0) is CLOSED and b.allow(2.0)
    assert not b.release_forced(2.0)
    b.record_failure(3.0)
    b.record_failure(3.0)  # our own trip
    assert b.own_trip(3.0) == 8.0
    assert not b.release_forced(3.0) and b.state(3.0) is OPEN


def test_the_later_of_two_trips_leads() -> None:
    b = breaker()
    b.record_failure(0.0)
    b.record_failure(0.0)  # ours: open until 5
    assert not b.force_open(4.0, hold_until_s=6.0, now_s=1.0)  # shorter: we keep ours and probe ourselves
    assert b.own_trip(1.0) == 5.0
    assert not b.force_open(5.0, hold_until_s=9.0, now_s=5.5)  # ours is half-open now; still not longer
    assert b.force_open(7.0, hold_until_s=9.0, now_s=5.5)  # longer: we follow it
    assert b.own_trip(5.5) is None and b.view(5.5).open_until_s == 7.0


def test_a_failed_own_probe_after_the_hold_is_our_own_trip() -> None:
    b = breaker()
    b.force_open(1.0, hold_until_s=2.0, now_s=0.0)
    assert b.allow(2.0)
    b.record_failure(2.0)
    assert b.own_trip(2.0) == 12.0  # doubled, and now ours to publish
    assert not b.view(2.0).shared


def test_a_past_trip_still_holds_its_probe() -> None:
    b = breaker()
    assert b.force_open(1.0, hold_until_s=4.0, now_s=2.0)
    assert b.state(2.0) is HALF_OPEN and not b.allow(3.0) and b.allow(4.0)


# ---- the routing snapshot with a shared view --------------------------------------------------------------


def test_routing_state_snapshots_use_the_shared_view_until_it_is_removed() -> None:
    config = parse_config(
        {
            "backends": {"gpu": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"m": {"deployments": [{"backend": "gpu", "upstream_model": "up"}]}},
        }
    )
    spec = DeploymentSpec("m", "m@gpu", "gpu", BackendKind.OPENAI, "up", PrivacyTier.INTERNAL, FREE)
    state = RoutingState(config, {"m@gpu": spec})
    state.stats.request_started("m@gpu")
    busy = dataclasses.replace(PRIORS, in_flight=4)
    state.set_shared(SharedView({"m@gpu": (remote(busy, 0.0),)}, math.inf, 10.0))
    assert state.snapshot(0.0).deployments["m@gpu"][1].in_flight == 5
    assert state.stats.snapshot(0.0)["m@gpu"].in_flight == 1  # the local book is untouched
    state.set_shared(None)
    assert state.snapshot(0.0).deployments["m@gpu"][1].in_flight == 1


def test_the_tail_factor_travels_and_an_older_replicas_summary_reads_as_one() -> None:
    stats = {"d": dataclasses.replace(seen(100.0, in_flight=1), ttft_tail_factor=2.5)}
    raw = encode_summary(stats, {"d": Evidence(1.0, 1.0)}, {}, offset_s=0.0)
    decoded = decode_summary(raw, replica_id="w", offset_s=0.0)
    assert decoded is not None and decoded["d"].stats.ttft_tail_factor == 2.5
    older = orjson.loads(raw)
    del older["deps"]["d"]["ttft_tail_factor"]  # a replica from before the field
    decoded = decode_summary(orjson.dumps(older), replica_id="w", offset_s=0.0)
    assert decoded is not None and decoded["d"].stats.ttft_tail_factor == 1.0
    # Merged, the largest any replica measured stands.
    view = SharedView({"d": (remote(stats["d"], 0.0),)}, 10.0, 10.0)
    assert view.merge({"d": PRIORS}, {}, 10.0)["d"].ttft_tail_factor == 2.5


def test_prompt_load_travels_adds_up_and_an_older_replicas_summary_reads_as_zero() -> None:
    """Pending prompts' context and the in-flight prompts' tokens (routing.fleet.predict) go to the other
    replicas, add up there, and read as 0 from a replica that sends neither."""
    busy = dataclasses.replace(
        seen(100.0, in_flight=1),
        pending_prompt_tokens=900,
        pending_prompt_context=4.5e5,
        in_flight_context=1500,
    )
    raw = encode_summary({"d": busy}, {"d": Evidence(1.0, 1.0)}, {}, offset_s=0.0)
    decoded = decode_summary(raw, replica_id="w", offset_s=0.0)
    assert decoded is not None
    assert (decoded["d"].stats.pending_prompt_context, decoded["d"].stats.in_flight_context) == (4.5e5, 1500)
    older = orjson.loads(raw)
    del older["deps"]["d"]["pending_prompt_context"], older["deps"]["d"]["in_flight_context"]
    decoded = decode_summary(orjson.dumps(older), replica_id="w", offset_s=0.0)
    assert decoded is not None
    assert (decoded["d"].stats.pending_prompt_context, decoded["d"].stats.in_flight_context) == (0.0, 0)
    # Merged with this replica's own, both count: the prompts wait on one box.
    view = SharedView({"d": (remote(busy, 0.0),)}, 10.0, 10.0)
    mine = dataclasses.replace(
        PRIORS, pending_prompt_tokens=100, pending_prompt_context=5e3, in_flight_context=300
    )
    merged = view.merge({"d": mine}, {}, 10.0)["d"]
    assert (merged.pending_prompt_tokens, merged.pending_prompt_context, merged.in_flight_context) == (
        1000,
        4.55e5,
        1800,
    )
