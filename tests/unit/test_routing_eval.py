"""bench/routing_eval: the workload generator, the simulator's invariants, the Switchboard policy's path."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest

from bench.routing_eval import switchboard as sb_module
from bench.routing_eval.baselines import AlwaysCloud, baselines
from bench.routing_eval.conversation import messages_of
from bench.routing_eval.fleet import StepModel, make_fleet
from bench.routing_eval.metrics import summarise
from bench.routing_eval.sim import CLOUD, Simulation
from bench.routing_eval.switchboard import Switchboard, policy_of
from bench.routing_eval.workload import SENSITIVE_SHARE, TEAM_BY_NAME, WORKLOADS, Request, generate
from routing.privacy import PrivacyTier
from routing.scoring import choose

MODEL = StepModel(step_base_ms=12.0, step_ms_per_stream=5.0, prefill_ms_per_token=0.5)


@pytest.fixture(scope="module")
def trace() -> list[Request]:
    return generate(WORKLOADS["bursty-agents"], rate_per_s=4.0, duration_s=300, seed=3)


def test_same_seed_same_trace_and_another_seed_another(trace: list[Request]) -> None:
    again = generate(WORKLOADS["bursty-agents"], rate_per_s=4.0, duration_s=300, seed=3)
    other = generate(WORKLOADS["bursty-agents"], rate_per_s=4.0, duration_s=300, seed=4)
    assert again == trace
    assert other != trace


def test_trace_has_the_stated_mix(trace: list[Request]) -> None:
    n = len(trace)
    assert 900 < n < 1500  # 4/s over 300 s
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    assert abs(sum(1 for r in trace if r.planted) / n - SENSITIVE_SHARE) < 0.04
    agents = [r for r in trace if r.session >= 0]
    assert abs(len(agents) / n - WORKLOADS["bursty-agents"].agent_share) < 0.06
    turns = Counter(r.session for r in agents)
    assert max(turns.values()) >= 3  # sessions have several turns sharing their prefix
    assert all(r.prefix_key.startswith("agent:") and r.prompt_tokens > r.prefix_tokens for r in agents)
    prompts = sorted(r.prompt_tokens for r in trace if r.session < 0)
    assert prompts[len(prompts) * 99 // 100] > 5 * prompts[len(prompts) // 2]  # heavy tail


def test_floors_come_from_the_real_detectors_and_team_floors(trace: list[Request]) -> None:
    for r in trace:
        team_floor = TEAM_BY_NAME[r.team].floor
        assert r.floor.rank <= team_floor.rank
        if r.planted:
            assert r.detected, r.text
            assert r.floor.rank <= PrivacyTier.INTERNAL.rank
        if not r.detected:
            assert r.floor == team_floor


def test_bursty_arrivals_are_burstier_than_diurnal() -> None:
    def peak_to_mean(name: str) -> float:
        t = generate(WORKLOADS[name], rate_per_s=4.0, duration_s=1200, seed=5)
        per_10s = Counter(int(r.arrival_s // 10) for r in t)
        return max(per_10s.values()) / (len(t) / 120)

    assert peak_to_mean("bursty-agents") > 2.0
    assert 1.3 < peak_to_mean("diurnal-chat") < 2.6


@pytest.mark.parametrize("policy_index", range(7))
def test_every_request_completes_or_is_rejected_and_tokens_are_conserved(
    trace: list[Request], policy_index: int
) -> None:
    policy = [*baselines(), Switchboard()][policy_index]
    result = Simulation(make_fleet(MODEL, 2, "test"), seed=1).run(trace, policy)
    seen = Counter([j.req.rid for j in result.jobs] + [r.rid for r in result.rejected])
    assert seen == Counter(r.rid for r in trace)
    for j in result.jobs:
        assert 0 < j.ttft_s <= j.e2e_s < math.inf
        assert j.prefill_left == 0 and j.decode_left <= 1e-6
    for name, box in result.boxes.items():
        mine = [j for j in result.jobs if j.target == name]
        assert not box.waiting and not box.prefilling and not box.decoding
        cached = sum(j.cached_tokens for j in mine)
        assert box.prefill_computed + cached == sum(j.req.prompt_tokens for j in mine)
        assert box.decoded == sum(j.req.output_tokens for j in mine)
    assert all(j.cost_usd == 0 for j in result.jobs if j.target != CLOUD)


def test_privacy_accounting(trace: list[Request]) -> None:
    fleet = make_fleet(MODEL, 2, "test")
    naive = summarise(Simulation(fleet, seed=1).run(trace, AlwaysCloud()))
    assert naive.privacy_violations == sum(1 for r in trace if r.floor.rank < PrivacyTier.EXTERNAL.rank) > 0
    assert summarise(Simulation(fleet, seed=1).run(trace, Switchboard())).privacy_violations == 0


def _cached(model: StepModel, trace: list[Request]) -> dict[int, int]:
    result = Simulation(make_fleet(model, 1, "test"), seed=1).run(trace, _Fixed("engine-0"))
    return {j.req.rid: j.cached_tokens for j in result.jobs}


BASE = Request(0, 0.0, "agents", 700, 200, "agent:coder", 640, 0, "hi", "", PrivacyTier.EXTERNAL, ())


def test_without_prefix_caching_prefix_blocks_are_shared_only_while_a_holder_runs() -> None:
    concurrent = dataclasses.replace(BASE, rid=1, arrival_s=1.0)
    later = dataclasses.replace(BASE, rid=2, arrival_s=500.0)
    model = dataclasses.replace(MODEL, prefix_caching=False)
    assert _cached(model, [BASE, concurrent, later]) == {0: 0, 1: 640, 2: 0}


def test_a_finished_turns_prompt_and_answer_stay_cached_for_the_next_turn_until_evicted() -> None:
    later = dataclasses.replace(BASE, rid=1, arrival_s=500.0)  # the system prompt stays cached
    turn = dataclasses.replace(BASE, rid=2, arrival_s=600.0, prompt_tokens=990, history_tokens=300, follows=0)
    other = dataclasses.replace(BASE, rid=3, arrival_s=601.0, prefix_key="agent:triage", session=1)
    # Turn 0's prompt and answer: 700 + 200 - 1 computed tokens (the last sampled one is never fed back) ->
    # 56 blocks of 16.
    assert _cached(MODEL, [BASE, later, turn, other]) == {0: 0, 1: 640, 2: 896, 3: 0}
    # A cache of 1000 tokens: the first session's entries go when the other session's prompt needs room.
    small = dataclasses.replace(MODEL, kv_tokens=1000)
    other = dataclasses.replace(other, arrival_s=100.0)
    turn = dataclasses.replace(turn, arrival_s=700.0)
    assert _cached(small, [BASE, other, turn]) == {0: 0, 3: 0, 2: 0}


def test_a_turn_finds_the_earlier_turns_a_box_served_though_the_last_went_elsewhere() -> None:
    @dataclasses.dataclass
    class _ByRid:
        name: str = "by-rid"

        def route(self, req: Request, now: float, sim: Simulation) -> str | None:
            return CLOUD if req.rid == 1 else "engine-0"

        def observe(self, job: object) -> None:
            return None

    second = dataclasses.replace(BASE, rid=1, arrival_s=300.0, prompt_tokens=990, follows=0, ancestors=(0,))
    third = dataclasses.replace(BASE, rid=2, arrival_s=600.0, prompt_tokens=1300, follows=1, ancestors=(1, 0))
    result = Simulation(make_fleet(MODEL, 1, "test"), seed=1).run([BASE, second, third], _ByRid())
    cached = {j.req.rid: (j.target, j.cached_tokens) for j in result.jobs}
    # The cloud served turn 1; engine-0 still holds turn 0's whole prompt and answer (899 computed tokens ->
    # 56 blocks), not only the system prompt (640).
    assert cached == {0: ("engine-0", 0), 1: (CLOUD, 0), 2: ("engine-0", 896)}


@dataclasses.dataclass
class _Fixed:
    target: str
    name: str = "fixed"

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        return self.target

    def observe(self, job: object) -> None:
        return None


def test_switchboard_decides_with_routing_scoring_choose(
    trace: list[Request], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    inputs: list[tuple[object, ...]] = []

    def spy(*args: object, **kwargs: object) -> object:
        decision = choose(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(decision)
        inputs.append(args)
        return decision

    monkeypatch.setattr(sb_module, "choose", spy)
    policy = Switchboard()
    sim = Simulation(make_fleet(MODEL, 2, "test"), seed=1)
    result = sim.run(trace[:200], policy)
    assert len(calls) == policy.decisions == 200
    routed = {j.req.rid: j.target for j in result.jobs}
    req = trace[199]
    last = policy.last
    assert last is not None and last is calls[-1]
    assert routed.get(req.rid) == (last.candidates[0].backend if last.candidates else None)
    request, snapshot, team_policy = inputs[-1]
    assert request.prompt_tokens == req.prompt_tokens and team_policy == policy_of(req.team)  # type: ignore[attr-defined]
    # The snapshot it decided on is a RoutingSnapshot of the simulated fleet: same inputs, same choice.
    again = choose(request, snapshot, team_policy, now_s=req.arrival_s)  # type: ignore[arg-type]
    assert again.candidates == last.candidates
    assert last.ranked and last.privacy_verdict


def test_an_agent_turn_sends_its_previous_turns_messages_then_its_own(trace: list[Request]) -> None:
    by_rid = {r.rid: r for r in trace}
    follows = [r for r in trace if r.follows >= 0]
    assert follows, "no session turn extends its previous one"
    for turn in follows[:20]:
        prev, mine = messages_of(by_rid[turn.follows], by_rid, 1), messages_of(turn, by_rid, 1)
        assert mine[: len(prev)] == prev and mine[len(prev)]["role"] == "assistant"
    # Given the answer the replay got for the previous turn, a turn sends that back, as an agent loop does.
    turn = follows[0]
    prev = messages_of(by_rid[turn.follows], by_rid, 1)
    answer = {"role": "assistant", "content": "The real answer."}
    mine = messages_of(turn, by_rid, 1, {turn.follows: answer["content"]})
    assert mine[: len(prev)] == prev and mine[len(prev)] == answer
    first = next(r for r in trace if r.session >= 0 and r.history_tokens == 0)
    assert [m["role"] for m in messages_of(first, by_rid)] == ["system", "user"]
    assert messages_of(first, by_rid, 1)[0] != messages_of(first, by_rid, 2)[0]  # replays share no block


@dataclasses.dataclass
class _Alternate:
    """Request i goes to engine-(i mod 2)."""

    name: str = "alternate"

    def route(self, req: Request, now: float, sim: Simulation) -> str | None:
        return f"engine-{req.rid % 2}"

    def observe(self, job: object) -> None:
        return None


@dataclasses.dataclass
class _Due(_Fixed):
    """`_Fixed` whose gateway tells the engine each request's deadline, as Switchboard's does."""

    def deadline_ms(self, req: Request) -> float | None:
        return Switchboard().deadline_ms(req)


def test_a_box_queues_and_prefills_earliest_deadline_first_when_its_policy_sends_deadlines() -> None:
    # Two prompts of four whole chunks on one box, behind a short one with a long answer. An analytics
    # prompt (60 s end-to-end SLO) arrives first, a support one (2.5 s TTFT SLO) a moment later. Sent with
    # deadlines, the support prompt's chunks go first, both while they share the box's steps and (one slot)
    # while both wait; without, arrival order.
    chunk = MODEL.max_prefill_tokens
    first = dataclasses.replace(BASE, prefix_key="f", session=-1, prompt_tokens=16, output_tokens=100)
    slow = dataclasses.replace(
        first, rid=1, arrival_s=0.001, team="analytics", prefix_key="a", prompt_tokens=4 * chunk
    )
    urgent = dataclasses.replace(slow, rid=2, arrival_s=0.002, team="support", prefix_key="s")
    assert (Switchboard().deadline_ms(slow), Switchboard().deadline_ms(urgent)) == (60_000, 2500)
    for slots in (8, 1):
        fleet = make_fleet(dataclasses.replace(MODEL, max_batch=slots, short_prefill_tokens=0), 1, "test")
        fleet = dataclasses.replace(fleet, boxes=fleet.owned)
        ttft = {}
        for policy in (_Due("engine-0"), _Fixed("engine-0")):
            jobs = Simulation(fleet, seed=1).run([first, slow, urgent], policy).jobs
            ttft[type(policy).__name__] = {j.req.team: j.ttft_s for j in jobs}
        assert ttft["_Due"]["support"] < ttft["_Due"]["analytics"], slots
        assert ttft["_Fixed"]["support"] > ttft["_Fixed"]["analytics"], slots
        assert ttft["_Due"]["support"] < ttft["_Fixed"]["support"]


def test_a_request_that_missed_the_deadline_its_gateway_sent_waits_behind_one_still_on_time() -> None:
    # One slot, held ~3.4 s by a long answer. A support question (2.5 s TTFT SLO) arrives first, an hr one
    # (4 s) a moment later. When the slot frees, support has missed its deadline and hr still can make its
    # own: hr goes first (earliest deadline first alone would take support), then support at once.
    first = dataclasses.replace(BASE, prefix_key="f", session=-1, prompt_tokens=16, output_tokens=200)
    support = dataclasses.replace(first, rid=1, arrival_s=0.001, team="support", prefix_key="s")
    support = dataclasses.replace(support, output_tokens=1)
    hr = dataclasses.replace(support, rid=2, arrival_s=0.002, team="hr", prefix_key="h")
    fleet = make_fleet(dataclasses.replace(MODEL, max_batch=1), 1, "test")
    fleet = dataclasses.replace(fleet, boxes=fleet.owned)
    ttft = {}
    for policy in (_Due("engine-0"), _Fixed("engine-0")):
        jobs = Simulation(fleet, seed=1).run([first, support, hr], policy).jobs
        ttft[type(policy).__name__] = {j.req.team: j.ttft_s for j in jobs}
    assert 2.5 < ttft["_Due"]["hr"] < 4.0  # support is late by then, hr still on time
    assert ttft["_Due"]["hr"] < ttft["_Due"]["support"] < ttft["_Due"]["hr"] + 0.1
    assert ttft["_Fixed"]["support"] < ttft["_Fixed"]["hr"]


def test_a_leftover_smaller_than_the_clock_can_step_still_finishes() -> None:
    """Late in a long run (t ~ 900 s, an ulp of ~1e-13 s) a prompt's last 1.5e-9 tokens, behind a long prompt
    (so the next event is that prompt's own end), are less time than the clock can step: the event still moves
    the clock and the prompt finishes, where the loop used to livelock (a 15-minute decode-bound trace)."""
    from bench.routing_eval.sim import Job

    model = dataclasses.replace(MODEL, prefill_ms_per_token=0.005)
    box = Simulation(make_fleet(model, 1, "test"), seed=1).boxes["engine-0"]
    box.t = 900.0
    tail = Job(BASE, "engine-0", 0.0, prefill_left=1.5e-9)
    box.prefilling += [tail, Job(dataclasses.replace(BASE, rid=1), "engine-0", 0.0, prefill_left=10_000.0)]
    at = box.next_event_s()
    assert at > box.t
    box.advance(at)
    box.settle()
    assert tail in box.decoding and tail.prefill_left == 0.0


def test_boxes_sharing_cores_step_slower_only_while_more_are_busy_than_there_are_cores() -> None:
    # Two identical answers on two boxes at once: with one shared core both take twice as long; with two
    # cores (or none shared) as long as alone. A lone answer on one shared core runs at full speed.
    pair = [dataclasses.replace(BASE, rid=i, prefix_key=f"p{i}", session=-1) for i in range(2)]

    def e2e(reqs: list[Request], cores: float | None) -> list[float]:
        fleet = make_fleet(MODEL, 2, "test")
        fleet = dataclasses.replace(fleet, boxes=fleet.owned)
        return [j.e2e_s for j in Simulation(fleet, seed=1, shared_cores=cores).run(reqs, _Alternate()).jobs]

    alone = e2e(pair, None)
    assert alone[0] == pytest.approx(alone[1])
    assert e2e(pair, 2) == pytest.approx(alone)
    assert e2e(pair, 1) == pytest.approx([2 * t for t in alone], rel=1e-6)
    assert e2e(pair[:1], 1) == pytest.approx(alone[:1])


def test_with_a_contended_curve_boxes_step_at_it_only_while_all_are_busy() -> None:
    # One shared core, two boxes. With a curve measured with both busy (here 3x slower than alone, where
    # busy / cores would say 2x) both answers take 3x as long; a lone answer runs at its own curve.
    pair = [dataclasses.replace(BASE, rid=i, prefix_key=f"p{i}", session=-1) for i in range(2)]
    slow = dataclasses.replace(
        MODEL, step_base_ms=3 * MODEL.step_base_ms, step_ms_per_stream=3 * MODEL.step_ms_per_stream,
        prefill_ms_per_token=3 * MODEL.prefill_ms_per_token,
    )  # fmt: skip

    def e2e(reqs: list[Request], contended: StepModel | None) -> list[float]:
        fleet = make_fleet(MODEL, 2, "test")
        fleet = dataclasses.replace(fleet, boxes=fleet.owned)
        sim = Simulation(fleet, seed=1, shared_cores=1 if contended else None, contended=contended)
        return [j.e2e_s for j in sim.run(reqs, _Alternate()).jobs]

    alone = e2e(pair, None)
    assert e2e(pair, slow) == pytest.approx([3 * t for t in alone], rel=1e-6)
    assert e2e(pair[:1], slow) == pytest.approx(alone[:1])


def test_a_short_prompt_computes_ahead_of_a_long_ones_remaining_chunks_as_the_engine_orders_them() -> None:
    # A prompt of eight whole chunks, then a 60-token one as its first chunk ends, on the same box: with the
    # engine's short-prefill rule the short one runs alone in the next step, and costs the long one just
    # that step; oldest first it waits out the long prompt (which fills its last step alone, so the short
    # one starts after it).
    chunk = MODEL.max_prefill_tokens
    chunk_s = (MODEL.step_base_ms + MODEL.prefill_ms_per_token * chunk) / 1000  # a step with a full chunk
    long = dataclasses.replace(BASE, prefix_key="long", session=-1, prompt_tokens=8 * chunk, output_tokens=2)
    short = dataclasses.replace(
        long, rid=2, arrival_s=chunk_s, prefix_key="short", prompt_tokens=60, output_tokens=1
    )

    def ttfts(short_prefill: int) -> tuple[float, float]:
        fleet = make_fleet(dataclasses.replace(MODEL, short_prefill_tokens=short_prefill), 1, "test")
        sim = Simulation(dataclasses.replace(fleet, boxes=fleet.owned), seed=1)
        jobs = {j.req.rid: j for j in sim.run([long, short], _Alternate()).jobs}
        return jobs[0].ttft_s, jobs[2].ttft_s

    (long_first, short_first), (long_fifo, short_fifo) = ttfts(128), ttfts(0)
    assert short_first == pytest.approx((MODEL.step_base_ms + 60 * MODEL.prefill_ms_per_token) / 1000)
    assert short_fifo > long_fifo - chunk_s
    assert long_first - long_fifo == pytest.approx(short_first, rel=1e-6)


def test_after_a_step_of_short_prompts_alone_the_next_carries_the_long_ones_chunk() -> None:
    # As the engine's scheduler: short prompts run alone at most every other step. A second 60-token prompt
    # arriving as the first one's step (alone) ends shares the next step with the long prompt's chunk: it is
    # computed at a full chunk's rate (the fluid's share of that step), not in a step of its own.
    chunk = MODEL.max_prefill_tokens
    chunk_s = (MODEL.step_base_ms + MODEL.prefill_ms_per_token * chunk) / 1000
    alone_s = (MODEL.step_base_ms + MODEL.prefill_ms_per_token * 60) / 1000
    long = dataclasses.replace(BASE, prefix_key="long", session=-1, prompt_tokens=8 * chunk, output_tokens=2)
    first = dataclasses.replace(
        long, rid=2, arrival_s=chunk_s, prefix_key="a", prompt_tokens=60, output_tokens=1
    )
    second = dataclasses.replace(first, rid=4, arrival_s=chunk_s + alone_s + 1e-9, prefix_key="b")
    fleet = make_fleet(MODEL, 1, "test")
    sim = Simulation(dataclasses.replace(fleet, boxes=fleet.owned), seed=1)
    jobs = {j.req.rid: j for j in sim.run([long, first, second], _Alternate()).jobs}
    assert jobs[2].ttft_s == pytest.approx(alone_s)
    assert jobs[4].ttft_s == pytest.approx(60 / chunk * chunk_s, rel=1e-3)  # not alone_s: a step of its own


def test_a_decoding_streams_step_grows_with_its_context() -> None:
    # d ms per context token: after its 700-token prompt, a stream's 2 remaining tokens each take
    # a + b + d x its context (~701 tokens) instead of a + b; its first token comes as before.
    req = dataclasses.replace(BASE, prefix_key="p", session=-1, output_tokens=3)

    def job(d: float) -> tuple[float, float]:
        fleet = make_fleet(dataclasses.replace(MODEL, decode_ms_per_context_token=d), 1, "test")
        done = Simulation(dataclasses.replace(fleet, boxes=fleet.owned), seed=1).run([req], _Alternate()).jobs
        return done[0].ttft_s, done[0].e2e_s

    (ttft0, e2e0), (ttft1, e2e1) = job(0.0), job(0.01)
    assert ttft1 == pytest.approx(ttft0)
    assert e2e1 - e2e0 == pytest.approx(2 * 0.01 * 701 / 1000, rel=1e-3)


def test_calibrate_fits_the_step_model_from_its_measurements() -> None:
    from bench.routing_eval.calibrate import fit

    decode = {n: 1000 * n / (12.0 + 5.0 * n) for n in (1, 2, 4, 8)}  # a = 12 ms, b = 5 ms a stream
    prefill = {50: 0.1, 850: 0.5}  # seconds to the first token: 0.5 ms a token at 1 token a word
    context = {20: 17.0, 1220: 29.0}  # one stream's step at 20 and 1220 context tokens: 0.01 ms a token
    got = fit(decode, prefill, 1.0, context)
    assert got == pytest.approx(
        {"step_base_ms": 12.0, "step_ms_per_stream": 5.0, "prefill_ms_per_token": 0.5,
         "decode_ms_per_context_token": 0.01}
    )  # fmt: skip
    assert "decode_ms_per_context_token" not in fit(decode, prefill, 1.0)  # an older curve's fit
    # Prefill points on TTFT = 20 + 0.4 T + 0.0005 T^2 / 2 ms: c = 0.4 and e = 0.0005 ms a token before
    # each prompt token, from three points or four (least squares); off the curve, the least-squares fit.
    for points in ((50, 400, 800), (50, 400, 800, 1200)):
        ttft_s = {t: (20 + 0.4 * t + 0.0005 * t * t / 2) / 1000 for t in points}
        got = fit(decode, ttft_s, 1.0)
        assert got["prefill_ms_per_token"] == pytest.approx(0.4)
        assert got["prefill_ms_per_context_token"] == pytest.approx(0.0005)
    ttft_s[800] += 0.01  # a noisy point: not through the others any more
    noisy = fit(decode, ttft_s, 1.0)
    assert 0.0004 < noisy["prefill_ms_per_context_token"] < 0.0006 and noisy["prefill_ms_per_token"] != 0.4
    # A curve whose noise bends it down keeps e = 0 and the least-squares slope: (50, 40), (400, 300), (800,
    # 500) ms: sum (T - 416.7)(y - 280) / sum (T - 416.7)^2 = 172,000 / 281,667 ms a token.
    bent = fit(decode, {50: 0.04, 400: 0.3, 800: 0.5}, 1.0)
    assert bent["prefill_ms_per_context_token"] == 0.0
    assert bent["prefill_ms_per_token"] == pytest.approx(172_000 / 281_667, abs=1e-4)  # rounded


def test_a_prompt_tokens_cost_grows_with_the_tokens_before_it() -> None:
    # e ms per earlier token: a 700-token prompt alone costs c x 700 + e x 700^2 / 2 more than its steps'
    # overhead; the same 60 new tokens cost more after a cached 640-token prefix than as a fresh prompt.
    model = dataclasses.replace(MODEL, prefill_ms_per_context_token=0.001)
    assert model.prompt_ms(700) == pytest.approx(0.5 * 700 + 0.001 * 700 * 700 / 2)
    assert model.prompt_ms(60, start=640) == pytest.approx(60 * (0.5 + 0.001 * 670))
    req = dataclasses.replace(BASE, prefix_key="p", session=-1, output_tokens=1, prompt_tokens=500)

    def ttft(m: StepModel) -> float:
        fleet = make_fleet(m, 1, "test")
        done = Simulation(dataclasses.replace(fleet, boxes=fleet.owned), seed=1).run([req], _Alternate()).jobs
        return done[0].ttft_s

    # Two steps (256 and 244 prompt tokens), each charging its tokens at their positions: e x 500^2 / 2 ms
    # more in all, as one step of 500 would.
    assert ttft(model) - ttft(MODEL) == pytest.approx(0.001 * 500 * 500 / 2 / 1000, rel=1e-6)


def test_late_requests_are_told_apart_by_what_could_have_saved_them() -> None:
    from bench.routing_eval.report import late_kinds
    from bench.routing_eval.sim import Job

    slow = StepModel(step_base_ms=10.0, step_ms_per_stream=5.0, prefill_ms_per_token=3.0)
    fleet = make_fleet(slow, 1, "test")  # engine-0 (internal) and edge nodes twice as slow
    internal = dataclasses.replace(BASE, floor=PrivacyTier.INTERNAL)

    def job(req: Request, ttft_s: float, target: str = "engine-0", cached: int = 0) -> Job:
        return Job(req, target, 0.0, cached_tokens=cached, ttft_s=ttft_s, e2e_s=ttft_s + 1.0)

    turn = dataclasses.replace(internal, prompt_tokens=2000, history_tokens=1200, follows=3)
    jobs = [
        # A cut conversation: only its 640-token system prompt could be cached; 1360 tokens take 4.1 s > 4 s.
        job(dataclasses.replace(internal, prompt_tokens=2000, history_tokens=1200), 5.0, cached=640),
        # A later turn whose earlier turns could have been cached (160 new tokens), but were not.
        job(turn, 6.2),
        # The same turn with its earlier turns cached, late anyway: queueing.
        job(turn, 4.5, cached=1840),
        job(dataclasses.replace(BASE, prompt_tokens=2000), 7.0, target=CLOUD),  # may leave: other
        job(internal, 1.0),  # in time: not counted
        # May run on edge nodes only: 1500 tokens there take 9 s (4.5 s on an engine box) > field's 8 s.
        job(dataclasses.replace(internal, team="field", floor=PrivacyTier.EDGE, prompt_tokens=1500,
                                prefix_tokens=0), 9.5, target="edge-0"),
    ]  # fmt: skip
    kinds = late_kinds(jobs, fleet)
    assert (kinds.beyond_reach, kinds.cold, kinds.other) == (2, 1, 2)


def test_an_agent_turns_ancestors_are_its_sessions_uncut_earlier_turns_latest_first(
    trace: list[Request],
) -> None:
    by_rid = {r.rid: r for r in trace}
    chained = [r for r in trace if r.follows >= 0]
    assert chained and all(r.ancestors[0] == r.follows for r in chained)
    for r in chained:
        assert r.ancestors == (
            r.follows,
            *by_rid[r.follows].ancestors,
        )  # each earlier prompt a prefix of this
        assert all(
            by_rid[a].session == r.session and by_rid[a].prompt_tokens < r.prompt_tokens for a in r.ancestors
        )
    assert all(r.ancestors == () for r in trace if r.follows < 0)


@pytest.mark.parametrize("prompt", [100, 800, 2000])
def test_routing_predicts_a_prompt_on_an_idle_box_as_the_box_computes_it(prompt: int) -> None:
    """The curve the `switchboard` policy gives routing (`capacity_of`: a flat prefill rate and the cost of
    attending to the tokens before) predicts an idle box's TTFT for short and long prompts alike; with the
    flat rate alone a 2,000-token prompt was predicted at ~60% of its time on the measured curve."""
    from bench.routing_eval.fleet import load_curve
    from bench.routing_eval.report import idle_ttft_ms
    from routing.fleet import predict

    model = load_curve()
    p = predict(
        ttft_ms=100, decode_tokens_per_s=50, p50_latency_ms=0, in_flight=0, queue_depth=0, running=0,
        capacity=sb_module.capacity_of(model),
    )  # fmt: skip
    predicted = p.ttft_base_ms + prompt * (p.ms_per_prompt_token + prompt * p.ms_per_prompt_token_sq)
    assert predicted == pytest.approx(idle_ttft_ms(model, prompt), rel=0.06)


def test_calibrate_prints_a_capacity_line_the_gateway_reads_as_the_simulators_curve() -> None:
    """The line calibrate prints parses as a gateway config's capacity and gives routing the curve the
    simulator's `switchboard` policy uses (less the must-stay reserve, a fleet's choice)."""
    import tomllib

    from bench.routing_eval.calibrate import config_line
    from bench.routing_eval.fleet import load_curve
    from gateway.config import CapacityConfig

    model = load_curve()
    got = CapacityConfig(**tomllib.loads(config_line(model))["capacity"]).curve()
    want = sb_module.capacity_of(model)
    assert got.prefill_us_per_context_token == pytest.approx(want.prefill_us_per_context_token, abs=1e-3)
    assert got.decode_us_per_context_token == pytest.approx(want.decode_us_per_context_token, abs=1e-3)
    assert got.decode_us_per_context_token > 0  # the curve file measured it
    assert got.prefill_tokens_per_s == pytest.approx(want.prefill_tokens_per_s, abs=0.05)
    assert [x for x, _ in got.tokens_per_s] == [x for x, _ in want.tokens_per_s]
    assert [y for _, y in got.tokens_per_s] == pytest.approx([y for _, y in want.tokens_per_s], abs=0.05)
    same = ("max_concurrency", "kv_cache_tokens", "prefill_chunk_tokens", "short_prefill_tokens")
    assert all(getattr(got, name) == getattr(want, name) for name in same)
    assert (got.reserve_slots, got.reserve_ttft_ms) == (0, None)


def test_switchboard_refuses_must_stay_work_predicted_past_its_first_token_deadline() -> None:
    from bench.routing_eval.report import late_kinds

    slow = StepModel(step_base_ms=10.0, step_ms_per_stream=5.0, prefill_ms_per_token=3.0)
    fleet = make_fleet(slow, 1, "test")
    hr = dataclasses.replace(
        BASE, team="hr", floor=PrivacyTier.INTERNAL, prompt_tokens=800, prefix_tokens=0, session=-1
    )
    burst = [dataclasses.replace(hr, rid=i, arrival_s=0.05 * i) for i in range(40)]  # ~2.4 s of prefill each
    deadline = TEAM_BY_NAME["hr"].max_ttft_ms
    assert deadline == 2 * TEAM_BY_NAME["hr"].slo_p95_ttft_ms
    policy = Switchboard()
    result = Simulation(fleet, 7).run(burst, policy)
    refused = {r.rid for r in result.rejected}
    assert 0 < len(refused) < len(burst) and {j.req.rid for j in result.jobs}.isdisjoint(refused)
    assert min(refused) > min(j.req.rid for j in result.jobs)  # the first arrivals served, not the tail
    assert all(policy.predicted_ttft_ms[j.req.rid] <= deadline for j in result.jobs)
    assert all(j.target != CLOUD for j in result.jobs)  # refused, never sent out
    metrics = summarise(result)
    assert metrics.rejected == len(refused) and metrics.slo_violations >= len(refused)
    assert late_kinds(result.jobs, fleet, len(refused)).refused == len(refused)


def test_a_chunk_takes_as_long_however_many_events_fall_inside_its_step() -> None:
    """The simulator advances in a fluid between events and re-reads a box's step at each one. A chunk's
    tokens are charged at the positions the chunk began with, so events inside a step (a stream finishing,
    an arrival) do not make the rest of the chunk dearer, as if it began where the prompt stands then: a
    2,048-token prompt on a curve with a context cost is done at the same time whether the box is
    re-read once a step or every 10 ms (before this, 19% later at every 10 ms: 3.76 s, not 3.17)."""
    from bench.routing_eval.sim import Box, Job

    model = dataclasses.replace(
        MODEL, prefill_ms_per_context_token=0.001, max_prefill_tokens=512, short_prefill_tokens=0
    )
    box_spec = make_fleet(model, 1, "test").owned[0]
    req = dataclasses.replace(BASE, session=-1, prompt_tokens=2048, prefix_tokens=0)

    def first_token_s(every_s: float | None) -> float:
        box = Box(box_spec)
        job = Job(req, box_spec.name, 0.0, prefill_left=2048.0)
        box.prefilling.append(job)
        while job.prefill_left > 1e-6:
            t = box.next_event_s()
            box.advance(min(t, box.t + every_s) if every_s else t)
        return box.t

    whole_steps = first_token_s(None)
    assert whole_steps == pytest.approx((4 * 12 + 2048 * 0.5 + 0.001 * 2048 * 1024) / 1000, rel=1e-6)
    assert first_token_s(0.01) == pytest.approx(whole_steps, rel=1e-6)
