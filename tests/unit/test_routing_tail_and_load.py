"""Three things routing learned from the evaluation's late requests (issue 15): the SLO check allows for how
late a deployment's predictions have run (`ttft_tail_factor`), prefix affinity ties engine replicas with
engine replicas only (not with a slower edge node), and a snapshot can take new load figures for a few
deployments without rebuilding the rest (`RoutingSnapshot.with_stats`). Pure functions; no I/O."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from backends.base import BackendKind
from routing.fleet import TAIL_MIN_SAMPLES, Capacity, holds_prefix, lateness, tail_factor
from routing.privacy import PrivacyTier as T
from routing.scoring import choose
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    RoutePolicy,
    RouteRequest,
)
from tests.unit.test_fleet_prefill_reserve import cloud, snap

CURVE = Capacity(tokens_per_s=((1, 40.0), (4, 120.0)), max_concurrency=4, prefill_tokens_per_s=200.0)
SLO = RoutePolicy(slo_p95_ttft_ms=2500)


def owned(
    name: str, kind: BackendKind = BackendKind.LOCAL, **stats: float
) -> tuple[DeploymentSpec, DeploymentStats]:
    spec = DeploymentSpec(
        public_model="m", deployment_id=name, backend=name, backend_kind=kind, upstream_model="up",
        privacy_tier=T.INTERNAL, price=HourlyPrice(Decimal("1")), capacity=CURVE,
    )  # fmt: skip
    return spec, DeploymentStats(ttft_ms=150, decode_tokens_per_s=40, **stats)  # type: ignore[arg-type]


def req(prompt: int, floor: T = T.EXTERNAL, **extra: object) -> RouteRequest:
    return RouteRequest("m", prompt_tokens=prompt, expected_output_tokens=50, privacy_floor=floor, **extra)  # type: ignore[arg-type]


# ---- the tail factor ---------------------------------------------------------------------------------------


def test_lateness_weighs_a_first_tokens_fixed_wait_less_on_a_short_prediction() -> None:
    # 170 ms later than predicted: most of an 80 ms prediction, little of a 2 s one, and the factor that
    # the long prediction is multiplied by should not come from the short one's step wait.
    assert lateness(250.0, 80.0) == pytest.approx(500 / 330)
    assert lateness(250.0, 80.0) < 250.0 / 80.0
    assert lateness(2170.0, 2000.0) == pytest.approx(2420 / 2250)
    assert lateness(6000.0, 2000.0) == pytest.approx(6250 / 2250)  # a queue running late still shows
    assert lateness(100.0, 100.0) == 1.0


def test_tail_factor_is_the_90th_percentile_of_lateness_and_never_below_one() -> None:
    assert tail_factor([3.0] * (TAIL_MIN_SAMPLES - 1)) == 1.0  # too few to judge
    ratios = [1.0] * 18 + [2.0, 4.0]  # 20 samples: the 18th of 20 is the p90
    assert tail_factor(ratios) == 1.0
    assert tail_factor([1.0] * 17 + [2.0, 3.0, 4.0]) == 2.0
    assert tail_factor([0.5] * 40) == 1.0  # predictions that run early are not shrunk
    with pytest.raises(ValueError, match="ttft_tail_factor"):
        DeploymentStats(ttft_ms=1, decode_tokens_per_s=1, ttft_tail_factor=0.5)


def test_a_box_whose_predictions_run_late_overflows_sooner() -> None:
    # 300 prompt tokens at 200/s: predicted ~1.6 s, within 2.5 s; measured 2x late, it would not be.
    trusted = choose(req(300), snap(owned("box"), cloud()), SLO, now_s=0)
    assert trusted.candidates[0].backend == "box"
    late = choose(req(300), snap(owned("box", ttft_tail_factor=2.0), cloud()), SLO, now_s=0)
    assert late.candidates[0].backend == "cloud"
    assert "overflow: box predicted ttft" in late.reason and "x2.0 measured lateness" in late.reason
    # A request that may not leave still goes to the box: the factor ranks, it does not reject.
    stays = choose(req(300, T.INTERNAL), snap(owned("box", ttft_tail_factor=2.0), cloud()), SLO, now_s=0)
    assert stays.candidates[0].backend == "box"


def test_must_stay_requests_pick_the_box_whose_measured_tail_is_shorter() -> None:
    # Both miss 2.5 s by prediction x factor; the one that is really closer comes first.
    a = owned("a", pending_prompt_tokens=400, ttft_tail_factor=1.0)  # 2 s + 1.5 s ahead: ~3.6 s
    b = owned("b", pending_prompt_tokens=0, ttft_tail_factor=3.0)  # ~1.6 s predicted, but x3: ~4.8 s
    decision = choose(req(300, T.INTERNAL), snap(a, b), SLO, now_s=0)
    assert [c.backend for c in decision.candidates[:2]] == ["a", "b"]


# ---- affinity ties replicas of one kind ---------------------------------------------------------------


def test_prefix_affinity_does_not_send_a_conversation_to_an_edge_node_over_an_engine_replica() -> None:
    edge_spec, edge_stats = owned("edge", BackendKind.EDGE)
    half = Capacity(tokens_per_s=((1, 20.0), (4, 60.0)), max_concurrency=4, prefill_tokens_per_s=150.0)
    slower = dataclasses.replace(edge_spec, capacity=half)  # a device: slower, still within the SLO
    fleet = snap(owned("r0"), owned("r1"), (slower, edge_stats))
    chosen = {choose(req(300, T.INTERNAL, prefix_key=key), fleet, SLO, now_s=0).candidates[0].backend
              for key in range(60)}  # fmt: skip
    assert chosen == {"r0", "r1"}  # spread over the engine replicas, never the edge node
    # With the engine replicas gone, edge nodes are replicas of each other.
    edges = snap(owned("e0", BackendKind.EDGE), owned("e1", BackendKind.EDGE))
    decision = choose(req(300, T.INTERNAL, prefix_key=3), edges, SLO, now_s=0)
    assert "prefix affinity" in decision.reason


# ---- a snapshot's load moved without a rebuild -------------------------------------------------------------


def test_with_stats_rebuilds_only_the_deployments_whose_load_moved() -> None:
    base = snap(owned("r0"), owned("r1"), cloud())
    r0_spec, r0_stats = base.deployments["r0"]
    busy = dataclasses.replace(r0_stats, in_flight=4, pending_prompt_tokens=2000)
    patched = base.with_stats({"r0": busy})
    assert patched.deployments["r0"] == (r0_spec, busy)
    old = {e.deployment_id: e for e in base.by_model["m"]}
    new = {e.deployment_id: e for e in patched.by_model["m"]}
    assert new["r1"] is old["r1"] and new["cloud"] is old["cloud"]  # untouched entries are reused
    assert new["r0"].ttft_base_ms > old["r0"].ttft_base_ms + 9000  # 2000 tokens ahead at 200/s
    assert [row[0] for row in patched.hot_by_model["m"]] == list(patched.by_model["m"])
    # The same choice a full rebuild makes.
    rebuilt = snap((r0_spec, busy), base.deployments["r1"], base.deployments["cloud"])
    for r in (req(300), req(300, T.INTERNAL)):
        assert choose(r, patched, SLO, now_s=0).ranked == choose(r, rebuilt, SLO, now_s=0).ranked
    assert base.deployments["r0"][1] is r0_stats  # the original is unchanged
    with pytest.raises(KeyError):
        base.with_stats({"nope": busy})


# ---- an edge node's reserve is kept for the traffic only it may serve ---------------------------------


def test_an_edge_nodes_reserve_is_kept_for_edge_floor_requests() -> None:
    reserved = dataclasses.replace(CURVE, reserve_slots=1, reserve_ttft_ms=3000.0)
    edge_spec, edge_stats = owned(
        "edge", BackendKind.EDGE, in_flight=3
    )  # 3 of 4 slots: the free one is reserved
    edge = (dataclasses.replace(edge_spec, privacy_tier=T.EDGE, capacity=reserved), edge_stats)
    engine = owned("engine", pending_prompt_tokens=200)  # a prefill queue, still within the SLO
    fleet = snap(edge, engine)
    slo = RoutePolicy(slo_p95_ttft_ms=4000)
    # An internal-floor request could be served by the engine: it leaves the edge node's last slot free.
    internal = choose(req(300, T.INTERNAL), fleet, slo, now_s=0)
    assert internal.candidates[0].backend == "engine"
    # Without the engine, the edge node's reserve does not bind: there is nowhere less private to go.
    alone = choose(req(300, T.INTERNAL), snap(edge), slo, now_s=0)
    assert alone.ranked[0].slo_met
    # A request that must stay on the edge takes the reserved slot.
    on_edge = choose(req(300, T.EDGE), fleet, slo, now_s=0)
    assert on_edge.candidates[0].backend == "edge" and on_edge.ranked[0].slo_met


def test_holds_prefix_counts_writes_against_half_the_engines_kv_cache() -> None:
    sized = dataclasses.replace(CURVE, kv_cache_tokens=10_000)
    assert holds_prefix(sized, 0) and holds_prefix(sized, 5000) and not holds_prefix(sized, 5001)
    assert holds_prefix(CURVE, 10**9) and holds_prefix(None, 10**9)  # no size known: kept
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        dataclasses.replace(CURVE, kv_cache_tokens=-1)
