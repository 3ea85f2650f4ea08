"""Prompt length in routing's TTFT prediction (a prefill rate in the capacity curve, the prompt tokens
pending on the box from the live stats) and the reserve for must-stay traffic: requests that could go to
the cloud leave reserved slots free and a short prefill queue; requests that may not leave use it all.
Pure functions over made-up snapshots; no I/O."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from backends.base import BackendKind
from routing.decision import Price
from routing.fleet import Capacity, Prediction, predict, prompt_context
from routing.privacy import PrivacyTier as T
from routing.scoring import choose
from routing.snapshot import (
    DeploymentSpec,
    DeploymentStats,
    HourlyPrice,
    RoutePolicy,
    RouteRequest,
    RoutingSnapshot,
)

# 4 slots, 40 tok/s alone and 120 tok/s full; 200 prompt tokens/s of prefill.
PREFILL = Capacity(tokens_per_s=((1, 40.0), (4, 120.0)), max_concurrency=4, prefill_tokens_per_s=200.0)
RESERVED = Capacity(
    tokens_per_s=((1, 40.0), (4, 120.0)), max_concurrency=4, prefill_tokens_per_s=200.0,
    reserve_slots=1, reserve_ttft_ms=1500.0,
)  # fmt: skip
SLO = RoutePolicy(slo_p95_ttft_ms=4000)


def box(
    capacity: Capacity, *, in_flight: int = 0, pending: int = 0, pending_context: float = 0.0
) -> tuple[DeploymentSpec, DeploymentStats]:
    spec = DeploymentSpec(
        public_model="m", deployment_id="box", backend="box", backend_kind=BackendKind.LOCAL,
        upstream_model="up", privacy_tier=T.INTERNAL, price=HourlyPrice(Decimal("1")), capacity=capacity,
    )  # fmt: skip
    stats = DeploymentStats(
        ttft_ms=150, decode_tokens_per_s=40, in_flight=in_flight, pending_prompt_tokens=pending,
        pending_prompt_context=pending_context,
    )  # fmt: skip
    return spec, stats


def cloud() -> tuple[DeploymentSpec, DeploymentStats]:
    spec = DeploymentSpec(
        public_model="m", deployment_id="cloud", backend="cloud", backend_kind=BackendKind.CLOUD,
        upstream_model="up", privacy_tier=T.EXTERNAL, price=Price(Decimal("0.15"), Decimal("0.60")),
    )  # fmt: skip
    return spec, DeploymentStats(ttft_ms=500, decode_tokens_per_s=70)


def snap(*pairs: tuple[DeploymentSpec, DeploymentStats]) -> RoutingSnapshot:
    return RoutingSnapshot({s.deployment_id: (s, st) for s, st in pairs})


def req(prompt: int, floor: T = T.EXTERNAL) -> RouteRequest:
    return RouteRequest("m", prompt_tokens=prompt, expected_output_tokens=50, privacy_floor=floor)


def test_ttft_grows_with_this_prompt_and_the_prompts_pending_ahead() -> None:
    def ttft(prompt: int, pending: int) -> float:
        decision = choose(
            req(prompt, T.INTERNAL), snap(box(PREFILL, in_flight=1, pending=pending)), SLO, now_s=0
        )
        return decision.ranked[0].ttft_ms

    step = 1000 * 2 / PREFILL.aggregate_tokens_per_s(2)  # one decode step with 2 streams
    assert ttft(100, 0) == pytest.approx(step + 500)  # 100 tokens at 200/s
    assert ttft(800, 0) == pytest.approx(step + 4000)
    assert ttft(100, 400) == pytest.approx(step + 2500)  # 400 pending ahead, then its own 100
    latency = choose(req(800, T.INTERNAL), snap(box(PREFILL, in_flight=1)), SLO, now_s=0).ranked[0].latency_ms
    assert latency == pytest.approx(step + 4000 + 50 * step)  # prefill counts toward end-to-end too


# 2.5 µs a prompt token per token before it: n tokens from the start take n / 200 s + 2.5 µs x n^2 / 2.
CONTEXT = dataclasses.replace(PREFILL, prefill_us_per_context_token=2.5)


def test_a_long_prompt_is_predicted_at_its_own_pace_with_a_context_cost() -> None:
    """A prompt token's attention over the tokens before it: TTFT and e2e grow with the prompt's square."""

    def ranked(prompt: int, capacity: Capacity) -> tuple[float, float]:
        c = choose(req(prompt, T.INTERNAL), snap(box(capacity, in_flight=1)), SLO, now_s=0).ranked[0]
        return c.ttft_ms, c.latency_ms

    step = 1000 * 2 / CONTEXT.aggregate_tokens_per_s(2)
    for prompt, extra in ((100, 12.5), (800, 800.0), (2000, 5000.0)):  # 2.5e-3 ms x n^2 / 2
        flat_ttft, flat_latency = ranked(prompt, PREFILL)
        ttft, latency = ranked(prompt, CONTEXT)
        assert ttft == pytest.approx(step + prompt * 5 + extra)
        assert (ttft - flat_ttft, latency - flat_latency) == pytest.approx((extra, extra))
    # 2000 tokens: 10 s flat, 15 s with their context: over a 12 s SLO the cloud takes it
    s = snap(box(CONTEXT, in_flight=1), cloud())
    assert choose(req(2000), s, RoutePolicy(slo_p95_ttft_ms=12_000), now_s=0).candidates[0].backend == "cloud"
    flat = snap(box(PREFILL, in_flight=1), cloud())
    assert (
        choose(req(2000), flat, RoutePolicy(slo_p95_ttft_ms=12_000), now_s=0).candidates[0].backend == "box"
    )


def test_the_prompts_pending_ahead_are_charged_their_own_attention() -> None:
    """A request behind a long prompt waits for that prompt's prefill at its own pace, context included: a
    2,000-token prompt pending ahead takes 10 s flat + 5 s of attention, not 10 s. A prompt that the
    gateway expects cached after 1,000 tokens is charged from there."""

    def ttft(prompt: int, pending: int, context: float) -> float:
        b = box(CONTEXT, in_flight=1, pending=pending, pending_context=context)
        return choose(req(prompt, T.INTERNAL), snap(b), SLO, now_s=0).ranked[0].ttft_ms

    step = 1000 * 2 / CONTEXT.aggregate_tokens_per_s(2)
    own = 100 * 5 + 12.5  # its own 100 tokens
    assert prompt_context(2000) == 2000 * 1000 and prompt_context(500, 1000) == 500 * 1250
    assert ttft(100, 2000, prompt_context(2000)) == pytest.approx(step + 10_000 + 5000 + own)
    assert ttft(100, 500, prompt_context(500, 1000)) == pytest.approx(step + 2500 + 1562.5 + own)
    assert ttft(100, 2000, 0.0) == pytest.approx(step + 10_000 + own)  # a gateway counting no context
    # 2,000 pending: 15 s, not 10 s, ahead of a 400-token prompt: past a 16 s SLO, the cloud takes it
    policy = RoutePolicy(slo_p95_ttft_ms=16_000)
    ahead = snap(box(CONTEXT, in_flight=1, pending=2000, pending_context=prompt_context(2000)), cloud())
    assert choose(req(400), ahead, policy, now_s=0).candidates[0].backend == "cloud"
    flat = snap(box(CONTEXT, in_flight=1, pending=2000), cloud())
    assert choose(req(400), flat, policy, now_s=0).candidates[0].backend == "box"


def test_a_short_turn_waits_for_one_chunk_at_the_pending_prompts_mean_context() -> None:
    """With the engine's short-prompt priority, a conversation's short next turn on its holder waits only
    for the chunk in progress: 256 tokens of the pending prompt, charged at their mean context a token
    (`Prediction.short_saving_ms` is what it saves on the whole queue)."""
    short = dataclasses.replace(CONTEXT, prefill_chunk_tokens=256, short_prefill_tokens=128)
    p = predict(
        ttft_ms=150, decode_tokens_per_s=40, p50_latency_ms=0, in_flight=1, queue_depth=0, running=None,
        capacity=short, pending_prompt_tokens=2000, pending_prompt_context=prompt_context(2000),
    )  # fmt: skip
    step = 1000 * 2 / short.aggregate_tokens_per_s(2)  # each 256-token chunk also waits for a decode step
    queue = 2000 * 5 + 5000 + 2000 / 256 * step  # the whole pending prompt, its attention included
    chunk = 256 * 5 + 2.5e-3 * 256 * 1000 + step  # 256 of its tokens at a mean 1,000 tokens before each
    assert p.short_saving_ms == pytest.approx(queue - chunk)


def test_a_box_whose_running_requests_hold_long_prompts_is_predicted_at_its_slower_steps() -> None:
    """Each decoding stream's step reads its whole context: with 3 µs a context token, 3 running requests
    holding 6,000 prompt tokens make every step 18 ms longer than the curve's short-context figure, for the
    first token and each one after it. With more requests than slots, only those holding a slot decode."""
    slow = dataclasses.replace(PREFILL, decode_us_per_context_token=3.0)

    def predicted(capacity: Capacity, in_flight: int, context: int) -> Prediction:
        return predict(
            ttft_ms=150, decode_tokens_per_s=40, p50_latency_ms=0, in_flight=in_flight, queue_depth=0,
            running=None, capacity=capacity, in_flight_context=context,
        )  # fmt: skip

    plain, held = predicted(PREFILL, 3, 6000), predicted(slow, 3, 6000)
    assert held.ttft_base_ms - plain.ttft_base_ms == pytest.approx(18.0)
    assert held.ms_per_output_token - plain.ms_per_output_token == pytest.approx(18.0)
    assert predicted(slow, 3, 0) == plain  # nothing held: the curve as it is
    # 8 in flight on 4 slots: half of their 16,000 tokens decode at a time (24 ms a step more), and the new
    # request, fifth in line for a slot, waits 5 / 4 rounds of its own answer at that pace before its own
    crowded = (
        predicted(slow, 8, 16_000).ms_per_output_token - predicted(PREFILL, 8, 16_000).ms_per_output_token
    )
    assert crowded == pytest.approx(24.0 * (1 + 5 / 4))
    # Over a tight e2e SLO, the box whose requests hold long prompts loses a 200-token answer to the cloud.
    policy = RoutePolicy(slo_p95_e2e_ms=8000)  # ~7.4 s with 300 tokens held, ~13 s with 9,000
    spec, stats = box(slow, in_flight=3)
    light = snap((spec, dataclasses.replace(stats, in_flight_context=300)), cloud())
    heavy = snap((spec, dataclasses.replace(stats, in_flight_context=9000)), cloud())
    answer = RouteRequest("m", prompt_tokens=100, expected_output_tokens=200, privacy_floor=T.EXTERNAL)
    assert choose(answer, light, policy, now_s=0).candidates[0].backend == "box"
    assert choose(answer, heavy, policy, now_s=0).candidates[0].backend == "cloud"


def test_without_a_prefill_rate_the_prompt_length_is_ignored_as_before() -> None:
    plain = Capacity(tokens_per_s=((1, 40.0), (4, 120.0)), max_concurrency=4)
    short, long = (choose(req(n), snap(box(plain)), SLO, now_s=0).ranked[0].ttft_ms for n in (50, 3000))
    assert short == long == 150


def test_a_long_prompt_overflows_where_a_short_one_stays_on_owned_capacity() -> None:
    s = snap(box(PREFILL, in_flight=1, pending=300), cloud())
    assert choose(req(200), s, SLO, now_s=0).candidates[0].backend == "box"  # ~2.5 s: within 4 s
    long = choose(req(600), s, SLO, now_s=0)  # ~4.5 s: would break the SLO
    assert long.candidates[0].backend == "cloud"
    assert "overflow: box predicted ttft" in long.reason and "reserve" not in long.reason


def test_slot_wait_dominates_when_it_is_longer_than_the_prefill_queue() -> None:
    full = predict(ttft_ms=150, decode_tokens_per_s=40, p50_latency_ms=8000, in_flight=4, queue_depth=0,
                   running=None, capacity=PREFILL, pending_prompt_tokens=100)  # fmt: skip
    assert full.waiting == 1
    step = 1000 * 4 / 120
    assert full.ttft_base_ms == pytest.approx(step + 8000 / 4)  # a quarter of a p50 service time > 0.5 s
    assert full.ms_per_prompt_token == pytest.approx(5.0)


def test_cloud_eligible_requests_leave_the_reserved_slots_free() -> None:
    s = snap(box(RESERVED, in_flight=3), cloud())  # 1 slot free, and it is the reserve
    may_leave = choose(req(50), s, SLO, now_s=0)
    assert may_leave.candidates[0].backend == "cloud"
    assert "(reserve kept for must-stay traffic)" in may_leave.reason
    assert not next(c for c in may_leave.ranked if c.deployment_id == "box").slo_met
    must_stay = choose(req(50, T.INTERNAL), s, SLO, now_s=0)
    assert must_stay.candidates[0].backend == "box" and must_stay.ranked[0].slo_met
    assert (
        choose(req(50), snap(box(RESERVED, in_flight=2), cloud()), SLO, now_s=0).candidates[0].backend
        == "box"
    )


def test_cloud_eligible_requests_keep_the_prefill_queue_within_the_reserve_bound() -> None:
    s = snap(box(RESERVED, in_flight=1, pending=200), cloud())
    # 200 pending + 150 own = 1.75 s + a step: within the 4 s SLO but past the 1.5 s reserve bound
    assert choose(req(150), s, SLO, now_s=0).candidates[0].backend == "cloud"
    assert choose(req(150, T.INTERNAL), s, SLO, now_s=0).candidates[0].backend == "box"
    assert choose(req(20), s, SLO, now_s=0).candidates[0].backend == "box"  # 1.1 s + a step


def test_the_reserve_does_not_bind_when_the_cloud_is_not_an_option() -> None:
    s = snap(box(RESERVED, in_flight=3))  # an external request, but only the owned box serves the model
    decision = choose(req(50), s, SLO, now_s=0)
    assert decision.candidates[0].backend == "box" and decision.ranked[0].slo_met


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"prefill_tokens_per_s": -1.0}, "capacity.prefill_tokens_per_s"),
        ({"reserve_slots": 4}, "capacity.reserve_slots"),
        ({"reserve_slots": -1}, "capacity.reserve_slots"),
        ({"reserve_ttft_ms": 0.0}, "capacity.reserve_ttft_ms"),
        ({"short_prefill_tokens": 128}, "capacity.prefill_chunk_tokens"),
        ({"prefill_chunk_tokens": -1}, "capacity.prefill_chunk_tokens"),
        ({"prefill_us_per_context_token": 1.0}, "capacity.prefill_us_per_context_token"),  # no rate
        ({"prefill_us_per_context_token": -1.0, "prefill_tokens_per_s": 200.0}, "per_context_token"),
        ({"decode_us_per_context_token": -0.1}, "capacity.decode_us_per_context_token"),
    ],
)
def test_bad_capacity_settings_name_the_setting(kwargs: dict[str, float], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        Capacity(tokens_per_s=((1, 40.0), (4, 120.0)), max_concurrency=4, **kwargs)  # type: ignore[arg-type]


def test_prefix_affinity_still_applies_when_no_owned_replica_meets_the_slo() -> None:
    def replica(name: str) -> tuple[DeploymentSpec, DeploymentStats]:
        spec, stats = box(PREFILL)
        return dataclasses.replace(spec, deployment_id=name, backend=name), stats

    s = snap(*(replica(f"r{i}") for i in range(3)))
    long = RouteRequest("m", prompt_tokens=2000, expected_output_tokens=50, privacy_floor=T.INTERNAL)
    chosen = set()
    for key in range(40):
        decision = choose(dataclasses.replace(long, prefix_key=key), s, SLO, now_s=0)  # 10 s: misses 4 s
        assert not decision.ranked[0].slo_met and "prefix affinity" in decision.reason
        again = choose(dataclasses.replace(long, prefix_key=key), s, SLO, now_s=0)
        assert again.candidates[0] == decision.candidates[0]  # the same replica for the same prefix
        chosen.add(decision.candidates[0].backend)
    assert chosen == {"r0", "r1", "r2"}  # spread by the key, not all on the closest


# ---- prefix affinity with a prefix cache: the holder counts only the uncached prompt -----------------------


def _replicas(pending: dict[str, int], capacity: Capacity = PREFILL) -> RoutingSnapshot:
    pairs = []
    for name in ("r0", "r1", "r2"):
        spec, stats = box(capacity, in_flight=1 if pending.get(name) else 0, pending=pending.get(name, 0))
        pairs.append((dataclasses.replace(spec, deployment_id=name, backend=name), stats))
    return snap(*pairs)


def _turn(key: int, cached: int = 0, holder: str | None = None) -> RouteRequest:
    return RouteRequest("m", prompt_tokens=1000, expected_output_tokens=50, privacy_floor=T.INTERNAL,
                        prefix_key=key, prefix_tokens=cached, prefix_holder=holder)  # fmt: skip


def _favourite(key: int) -> str:
    return choose(_turn(key), _replicas({}), SLO, now_s=0).candidates[0].backend


def test_the_replica_holding_the_prefix_predicts_only_the_prompt_its_cache_lacks() -> None:
    key = 7
    fav = _favourite(key)
    decision = choose(_turn(key, 800, fav), _replicas({}), SLO, now_s=0)
    by_id = {c.deployment_id: c for c in decision.ranked}
    other = next(c for name, c in by_id.items() if name != fav)
    assert decision.candidates[0].backend == fav
    # 200 prompt tokens/s: 1000 tokens take 5 s, the 200 the cache lacks 1 s; the others compute all 1000.
    assert other.ttft_ms - by_id[fav].ttft_ms == pytest.approx(4000)
    assert other.latency_ms - by_id[fav].latency_ms == pytest.approx(4000)
    # The previous turn went elsewhere (a spill): that replica holds it, and the conversation stays there.
    holder = next(name for name in by_id if name != fav)
    moved = choose(_turn(key, 800, holder), _replicas({}), SLO, now_s=0)
    assert moved.candidates[0].backend == holder
    # Without a holder (only the cloud has served the conversation), nothing is discounted.
    none = choose(_turn(key, 800), _replicas({}), SLO, now_s=0)
    assert len({round(c.ttft_ms) for c in none.ranked}) == 1


def test_affinity_spills_by_predicted_ttft_not_by_the_queue() -> None:
    key = 7
    fav = _favourite(key)
    # 600 prompt tokens pending on the holder (3 s) + its 200 uncached (1 s) beat 1000 elsewhere (5 s).
    kept = choose(_turn(key, 800, fav), _replicas({fav: 600}), SLO, now_s=0)
    assert kept.candidates[0].backend == fav and "spilled" not in kept.reason
    # 1600 pending (8 s + 1 s) lose to an idle replica's 5 s, though nobody waits for a slot.
    spilled = choose(_turn(key, 800, fav), _replicas({fav: 1600}), SLO, now_s=0)
    assert spilled.candidates[0].backend != fav
    assert f"spilled past {fav} (predicted ttft)" in spilled.reason
    # Without a cached-prefix estimate the prediction cannot see the cache: the queue rule alone applies.
    first_turn = choose(_turn(key), _replicas({fav: 1600}), SLO, now_s=0)
    assert first_turn.candidates[0].backend == fav


def test_a_short_tail_on_an_engine_that_computes_short_prompts_first_waits_for_one_chunk_at_most() -> None:
    # The same 1600 pending tokens, on engines computing short prompts (<= 128 tokens left) alone, ahead of
    # others' 256-token chunks: the holder's 200-token tail is not short, so it still spills; a 100-token
    # tail waits for the chunk in progress, 256 of them (1.28 s), + its own 0.5 s, where an idle replica
    # computes all 1000 (5 s).
    short_first = dataclasses.replace(PREFILL, prefill_chunk_tokens=256, short_prefill_tokens=128)
    key = 7
    fav = _favourite(key)
    busy = _replicas({fav: 1600}, short_first)
    assert choose(_turn(key, 800, fav), busy, SLO, now_s=0).candidates[0].backend != fav
    kept = choose(_turn(key, 900, fav), busy, SLO, now_s=0)
    assert kept.candidates[0].backend == fav and "spilled" not in kept.reason
    by_id = {c.deployment_id: c for c in kept.ranked}
    idle = next(c for name, c in by_id.items() if name != fav)
    # (plus one step: 25 ms a token alone, 30 ms beside the holder's one request; and a step for each chunk
    # of prompt: 1000 / 256 of them alone, the one in progress and 100 / 256 beside that request)
    idle_ms = 25 + 5000 + 1000 / 256 * 25
    assert idle.ttft_ms - by_id[fav].ttft_ms == pytest.approx(
        idle_ms - (30 + 1280 + 30 + 500 + 100 / 256 * 30)
    )
    # Engines computing oldest first (no short_prefill_tokens): the same tail waits for all 1600 (8 s).
    fifo = choose(_turn(key, 900, fav), _replicas({fav: 1600}), SLO, now_s=0)
    assert fifo.candidates[0].backend != fav


# ---- a prompt longer than the reserve's bound, on a fleet with room ----------------------------------------


def _fleet(*pending: int) -> RoutingSnapshot:
    """Reserved boxes b0, b1, ... with these prompt tokens pending (0: idle), and the cloud."""
    pairs = []
    for i, tokens in enumerate(pending):
        spec, stats = box(RESERVED, in_flight=1 if tokens else 0, pending=tokens)
        pairs.append((dataclasses.replace(spec, deployment_id=f"b{i}", backend=f"b{i}"), stats))
    return snap(*pairs, cloud())


def test_a_long_prompt_takes_an_idle_box_while_most_of_the_fleet_keeps_room() -> None:
    # 400 prompt tokens at 200/s: 2 s on an idle box, past the 1.5 s bound but within the 4 s SLO. Its own
    # prompt is no queue a must-stay request must wait behind when the other boxes are idle.
    spread = choose(req(400), _fleet(0, 0, 0), SLO, now_s=0)
    assert spread.candidates[0].backend.startswith("b") and spread.ranked[0].slo_met
    assert choose(req(400, T.INTERNAL), _fleet(0, 0, 0), SLO, now_s=0).candidates[0].backend.startswith("b")


def test_the_reserve_still_binds_where_too_few_boxes_would_keep_room() -> None:
    # One box: taking it would leave no room for a must-stay request arriving next.
    alone = choose(req(400), _fleet(0), SLO, now_s=0)
    assert alone.candidates[0].backend == "cloud" and "(reserve kept for must-stay traffic)" in alone.reason
    # Two of three boxes already have a prefill queue past the bound (320 tokens: 1.6 s): taking the idle
    # one would leave none with room.
    assert choose(req(400), _fleet(320, 320, 0), SLO, now_s=0).candidates[0].backend == "cloud"
    # Two boxes: with one taken, one of two (not most) would keep room.
    assert choose(req(400), _fleet(0, 0), SLO, now_s=0).candidates[0].backend == "cloud"


def test_a_box_whose_queue_is_already_past_the_bound_is_not_lent() -> None:
    # b0's 1.6 s queue + 2 s of its own would meet the 4 s SLO, but b0 has no room left to lend; the idle
    # boxes do, and 3 of the other 4 keep it with one of them taken.
    decision = choose(req(400), _fleet(320, 0, 0, 0, 0), SLO, now_s=0)
    by_id = {c.deployment_id: c for c in decision.ranked}
    assert not by_id["b0"].slo_met
    assert all(by_id[f"b{i}"].slo_met for i in range(1, 5))
    assert decision.candidates[0].backend != "b0"


def test_the_holder_of_a_prefix_saves_its_flat_and_context_cost() -> None:
    """1000 tokens, 800 cached on the holder: it computes 200 that attend to all 1000 (c x 200 + q x (1000^2 -
    800^2)), the others all 1000 (c x 1000 + q x 1000^2); q = 1.25e-3 ms."""
    key = 7
    fav = _favourite(key)
    decision = choose(_turn(key, 800, fav), _replicas({}, CONTEXT), SLO, now_s=0)
    by_id = {c.deployment_id: c for c in decision.ranked}
    other = next(c for name, c in by_id.items() if name != fav)
    step = 1000 / CONTEXT.aggregate_tokens_per_s(1)
    assert by_id[fav].ttft_ms == pytest.approx(step + 200 * 5 + 1.25e-3 * (1000**2 - 800**2))
    assert other.ttft_ms == pytest.approx(step + 1000 * 5 + 1.25e-3 * 1000**2)
