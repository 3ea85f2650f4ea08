"""Fleet economics in routing: owned capacity at marginal cost 0 while it has SLO-safe room, overflow to the
cloud when its predicted latency would break the SLO, privacy floors that never overflow, and prefix
affinity by rendezvous hashing. Pure functions over made-up snapshots; no I/O."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from decimal import Decimal

import pytest

from backends.base import BackendKind
from routing.decision import FREE, Price, RejectCode
from routing.fleet import Capacity, hrw_weight, owned_share_micro_usd, predict, stable_hash64
from routing.privacy import PrivacyTier as T
from routing.scoring import choose
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    Objective,
    RoutePolicy,
    RouteRequest,
    RoutingSnapshot,
)

CLOUD_PRICE = Price(Decimal("0.15"), Decimal("0.60"))
# A box that runs 4 requests at once: 40 tok/s alone, 120 tok/s aggregate when full; TTFT grows with queue.
BOX = Capacity(tokens_per_s=((1, 40.0), (4, 120.0)), ttft_ms=((0, 150.0), (4, 2150.0)), max_concurrency=4)
SLO = RoutePolicy(slo_p95_ttft_ms=1000, slo_p95_e2e_ms=20_000)
COST = RoutePolicy(objective=Objective.COST)


def owned(dep_id: str, *, in_flight: int = 0, queue_depth: int = 0, capacity: Capacity | None = BOX,
          ttft_ms: float = 150.0) -> tuple[DeploymentSpec, DeploymentStats]:  # fmt: skip
    spec = DeploymentSpec(
        public_model="m", deployment_id=dep_id, backend=dep_id, backend_kind=BackendKind.OPENAI,
        upstream_model="up", privacy_tier=T.INTERNAL, price=HourlyPrice(Decimal("2")), capacity=capacity,
    )  # fmt: skip
    return spec, DeploymentStats(ttft_ms=ttft_ms, decode_tokens_per_s=40, in_flight=in_flight,
                                 queue_depth=queue_depth)  # fmt: skip


def cloud(dep_id: str = "cloud") -> tuple[DeploymentSpec, DeploymentStats]:
    spec = DeploymentSpec(
        public_model="m", deployment_id=dep_id, backend=dep_id, backend_kind=BackendKind.CLOUD,
        upstream_model="up", privacy_tier=T.EXTERNAL, price=CLOUD_PRICE,
    )  # fmt: skip
    return spec, DeploymentStats(ttft_ms=300, decode_tokens_per_s=80)


def snap(*pairs: tuple[DeploymentSpec, DeploymentStats]) -> RoutingSnapshot:
    return RoutingSnapshot({s.deployment_id: (s, st) for s, st in pairs})


def req(floor: T = T.EXTERNAL, out: int = 100, prefix_key: int | None = None) -> RouteRequest:
    return RouteRequest("m", prompt_tokens=500, expected_output_tokens=out, privacy_floor=floor,
                        prefix_key=prefix_key)  # fmt: skip


# ---- the capacity curve -----------------------------------------------------------------------------------


def test_capacity_curve_interpolates_and_clamps() -> None:
    assert BOX.aggregate_tokens_per_s(1) == 40 and BOX.aggregate_tokens_per_s(4) == 120
    assert BOX.aggregate_tokens_per_s(2) == pytest.approx(40 + 80 / 3)
    assert BOX.aggregate_tokens_per_s(9) == 120  # flat past the last point
    assert BOX.ttft_at(2) == pytest.approx(1150) and BOX.ttft_at(6) == pytest.approx(3150)  # extrapolated
    with pytest.raises(ValueError, match="capacity.tokens_per_s"):
        Capacity(tokens_per_s=((4, 100.0), (2, 50.0)))


def test_prediction_waits_for_a_slot_only_when_the_box_is_full() -> None:
    def p(in_flight: int):  # type: ignore[no-untyped-def]
        return predict(ttft_ms=150, decode_tokens_per_s=40, p50_latency_ms=0, in_flight=in_flight,
                       queue_depth=0, running=None, capacity=BOX)  # fmt: skip

    idle, three, full, deep = p(0), p(3), p(4), p(9)
    assert (idle.waiting, three.waiting, full.waiting, deep.waiting) == (0, 0, 1, 6)
    assert idle.ttft_base_ms == 150 and three.ttft_base_ms == 150 and full.ttft_base_ms == pytest.approx(650)
    assert idle.ms_per_output_token == pytest.approx(25)  # alone: 40 tok/s
    assert three.ms_per_output_token == pytest.approx(1000 * 4 / 120)  # 4 running share 120 tok/s


# ---- marginal cost and SLO overflow -----------------------------------------------------------------------


def test_owned_capacity_is_free_at_the_margin_while_it_meets_the_slo() -> None:
    decision = choose(req(), snap(owned("gpu", in_flight=2), cloud()), SLO, now_s=0)
    best = decision.ranked[0]
    assert best.deployment_id == "gpu" and best.cost_pusd == 0 and best.slo_met
    assert decision.candidates[0].price == FREE
    assert decision.ranked[1].deployment_id == "cloud" and decision.ranked[1].cost_pusd > 0
    assert decision.reason.startswith("cheapest meeting SLO: gpu (0.0000 USD, ttft 150 ms")


def test_overflows_to_the_cloud_when_the_owned_queue_would_break_the_slo() -> None:
    decision = choose(req(), snap(owned("gpu", in_flight=8), cloud()), SLO, now_s=0)  # 5 waiting: 2650 ms
    assert [c.deployment_id for c in decision.ranked] == ["cloud", "gpu"]
    assert decision.ranked[0].slo_met and not decision.ranked[1].slo_met
    assert decision.ranked[1].ttft_ms == pytest.approx(2650)
    assert "overflow: gpu predicted ttft 2650 ms" in decision.reason
    assert "SLO p95 ttft<=1000 e2e<=20000 ms" in decision.reason


def test_without_an_slo_a_queue_does_not_overflow_a_cost_objective() -> None:
    decision = choose(req(), snap(owned("gpu", in_flight=8), cloud()), COST, now_s=0)
    assert decision.ranked[0].deployment_id == "gpu"


def test_end_to_end_slo_counts_decode_time() -> None:
    slow = RoutePolicy(slo_p95_e2e_ms=2000)  # 100 tokens at 40 tok/s alone: 150 + 2500 ms
    decision = choose(req(), snap(owned("gpu"), cloud()), slow, now_s=0)
    assert decision.ranked[0].deployment_id == "cloud"  # 300 + 1250 ms
    assert choose(req(out=20), snap(owned("gpu"), cloud()), slow, now_s=0).ranked[0].deployment_id == "gpu"


# ---- privacy floors never overflow -----------------------------------------------------------------------


def test_a_request_that_may_not_leave_queues_on_owned_capacity() -> None:
    decision = choose(req(T.INTERNAL), snap(owned("gpu", in_flight=8), cloud()), SLO, now_s=0)
    assert [c.deployment_id for c in decision.ranked] == ["gpu"]
    assert not decision.ranked[0].slo_met
    assert decision.reason.startswith("none meets SLO, closest: gpu")
    assert [r.deployment_id for r in decision.rejected] == ["cloud"]


def test_a_request_that_may_not_leave_fails_closed_when_its_deadline_cannot_be_met() -> None:
    deadline = RoutePolicy(slo_p95_ttft_ms=1000, max_latency_ms=3000)
    decision = choose(req(T.INTERNAL), snap(owned("gpu", in_flight=8), cloud()), deadline, now_s=0)
    assert decision.candidates == ()
    codes = {r.deployment_id: r.codes for r in decision.rejected}
    assert RejectCode.LATENCY in codes["gpu"] and codes["cloud"] == (RejectCode.PRIVACY,)
    # The same request that may leave goes to the cloud instead.
    assert choose(req(), snap(owned("gpu", in_flight=8), cloud()), deadline, now_s=0).ranked[
        0
    ].deployment_id == ("cloud")


def test_a_first_token_deadline_skips_the_boxes_predicted_past_it_and_fails_closed_past_all() -> None:
    fleet = snap(owned("busy", in_flight=8), owned("idle"), cloud())
    predicted = {c.deployment_id: c.ttft_ms for c in choose(req(T.INTERNAL), fleet, SLO, now_s=0).ranked}
    assert predicted["busy"] > 1500 > predicted["idle"]
    deadline = RoutePolicy(slo_p95_ttft_ms=1000, max_ttft_ms=1500)
    decision = choose(req(T.INTERNAL), fleet, deadline, now_s=0)
    assert [c.deployment_id for c in decision.ranked] == ["idle"]
    busy = next(r for r in decision.rejected if r.deployment_id == "busy")
    assert busy.codes == (RejectCode.TTFT,)
    assert busy.reasons == (f"predicted first token {predicted['busy']:.0f} ms > max 1500 ms",)
    alone = choose(req(T.INTERNAL), snap(owned("busy", in_flight=8), cloud()), deadline, now_s=0)
    assert alone.candidates == () and "busy: predicted first token" in alone.reason
    # One that may leave overflows instead, and without the deadline the must-stay one queues.
    busy_and_cloud = snap(owned("busy", in_flight=8), cloud())
    assert choose(req(), busy_and_cloud, deadline, now_s=0).candidates[0].backend == "cloud"
    assert choose(req(T.INTERNAL), busy_and_cloud, SLO, now_s=0).candidates[0].backend == "busy"


def test_a_first_token_deadline_counts_what_the_prefix_holder_has_cached() -> None:
    prefilling = Capacity(tokens_per_s=((1, 40.0),), max_concurrency=4, prefill_tokens_per_s=200)
    fleet = snap(owned("gpu", capacity=prefilling, ttft_ms=100.0))
    deadline = RoutePolicy(max_ttft_ms=2000)
    turn = RouteRequest("m", prompt_tokens=2000, expected_output_tokens=10, privacy_floor=T.INTERNAL,
                        prefix_key=7, prefix_tokens=1900, prefix_holder="gpu")  # fmt: skip
    held = choose(turn, fleet, deadline, now_s=0)
    assert held.candidates and held.ranked[0].ttft_ms < 2000  # 100 new tokens at 200/s
    cold = choose(replace(turn, prefix_holder=None), fleet, deadline, now_s=0)  # all 2000 at 200/s: 10 s
    assert cold.candidates == () and cold.rejected[0].codes == (RejectCode.TTFT,)


# ---- prefix affinity --------------------------------------------------------------------------------------

REPLICAS = ("gpu-a", "gpu-b", "gpu-c")


def _choice(key: int, **load: dict[str, int]) -> str:
    pairs = [owned(r, **load.get(r, {})) for r in REPLICAS]
    return choose(req(prefix_key=key), snap(*pairs, cloud()), SLO, now_s=0).ranked[0].deployment_id


def test_affinity_is_stable_and_spreads_prefixes_over_replicas() -> None:
    keys = [stable_hash64(f"system prompt {i}") for i in range(300)]
    first = [_choice(k) for k in keys]
    assert first == [_choice(k) for k in keys]  # deterministic, no state
    counts = Counter(first)
    assert set(counts) == set(REPLICAS) and min(counts.values()) > 60  # roughly even
    assert stable_hash64("abc") == 0xD8BB14D833D59559  # blake2b: the same in every process and release


def test_affinity_spills_to_the_next_replica_in_rendezvous_order_when_overloaded() -> None:
    key = stable_hash64("agent session 42")
    order = sorted(REPLICAS, key=lambda r: hrw_weight(key, stable_hash64(r)), reverse=True)
    assert _choice(key) == order[0]
    decision = choose(req(prefix_key=key), snap(*(owned(r) for r in REPLICAS), cloud()), SLO, now_s=0)
    assert decision.ranked[0].affinity == 1 and f"prefix affinity {order[0]} (HRW 1 of 3)" in decision.reason
    assert _choice(key, **{order[0]: {"in_flight": 7}}) == order[1]  # 4 waiting: TTFT 2150 ms breaks the SLO
    loose = RoutePolicy(slo_p95_ttft_ms=5000, affinity_max_waiting=1)

    def under_loose(in_flight: int) -> object:
        pairs = [owned(r, in_flight=in_flight if r == order[0] else 0) for r in REPLICAS]
        return choose(req(prefix_key=key), snap(*pairs), loose, now_s=0)

    kept = under_loose(4)  # 1 waiting: at the limit, and within the SLO
    assert kept.ranked[0].deployment_id == order[0]  # type: ignore[attr-defined]
    spilled = under_loose(5)  # 2 waiting > affinity_max_waiting 1, though within the SLO (1150 ms)
    assert spilled.ranked[0].deployment_id == order[1] and spilled.ranked[0].affinity == 2  # type: ignore[attr-defined]
    assert spilled.ranked[-1].deployment_id == order[0]  # type: ignore[attr-defined]
    assert f"spilled past {order[0]}" in spilled.reason  # type: ignore[attr-defined]


def test_removing_a_replica_moves_only_the_prefixes_it_held() -> None:
    keys = [stable_hash64(f"conversation {i}") for i in range(200)]
    before = {k: _choice(k) for k in keys}
    pairs = [owned(r) for r in REPLICAS[:2]]
    after = {k: choose(req(prefix_key=k), snap(*pairs), SLO, now_s=0).ranked[0].deployment_id for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != REPLICAS[2])


def test_no_prefix_key_means_no_affinity() -> None:
    decision = choose(req(), snap(*(owned(r) for r in REPLICAS)), SLO, now_s=0)
    assert all(c.affinity == 0 for c in decision.ranked) and "affinity" not in decision.reason


# ---- chargeback --------------------------------------------------------------------------------------------


def test_owned_share_is_busy_time_at_the_hourly_price() -> None:
    assert owned_share_micro_usd(3_600_000, Decimal("2")) == 2_000_000
    assert owned_share_micro_usd(1500, Decimal("3.6")) == 1500
