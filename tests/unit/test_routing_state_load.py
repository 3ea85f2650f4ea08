"""The gateway's routing state between snapshot rebuilds: its own load counts stay current (a burst inside
one refresh interval does not all land on the box that looked idle), and measured / predicted TTFT of the
requests it routes becomes each deployment's `ttft_tail_factor`. Real `RoutingState` and `DeploymentUse`,
scripted backends; no I/O."""

from __future__ import annotations

import pytest

from backends.base import BackendKind
from gateway.config import parse_config
from gateway.live.state import RoutingState, build_specs
from gateway.pipeline.attempt import DeploymentUse
from gateway.pipeline.dispatch import _predicted_ttft_ms
from routing.decision import FREE, Deployment
from routing.fleet import TAIL_MIN_SAMPLES, lateness
from routing.privacy import PrivacyTier
from routing.scoring import choose
from routing.snapshot import RouteRequest
from tests.support.scripted import ScriptedBackend

CURVE = {"tokens_per_s": [[1, 40], [4, 120]], "max_concurrency": 4, "prefill_tokens_per_s": 200}


def state(capacity: dict[str, object] | None = None) -> RoutingState:
    names = ("b0", "b1")
    backends = {n: ScriptedBackend(n, "ok") for n in names}
    owned = {
        "kind": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "usd_per_hour": 1,
        "capacity": capacity or CURVE,
    }
    config = parse_config(
        {
            "backends": dict.fromkeys(names, owned),
            "models": {"m": {"deployments": [{"backend": n, "upstream_model": "up"} for n in names]}},
            "teams": {"t": {"slo_p95_ttft_ms": 4000}},
        }
    )
    deps = {"m": tuple(Deployment("m", n, BackendKind.OPENAI, "up", FREE) for n in names)}
    return RoutingState(config, build_specs(config, backends, deps))


REQUEST = RouteRequest("m", prompt_tokens=400, expected_output_tokens=50, privacy_floor=PrivacyTier.INTERNAL)


def test_a_burst_inside_one_refresh_interval_sees_its_own_load() -> None:
    routing = state()
    first = routing.snapshot(100.0)
    assert routing.snapshot(100.001) is first  # nothing moved: the cached snapshot itself
    picked = choose(REQUEST, first, routing.policy("t"), now_s=100.0).candidates[0]
    routing.stats.request_started(f"m@{picked.backend}", 400)
    second = routing.snapshot(100.002)  # 2 ms later, well inside the 50 ms refresh
    busy = second.deployments[f"m@{picked.backend}"][1]
    assert (busy.in_flight, busy.pending_prompt_tokens, busy.pending_prompt_context) == (1, 400, 400 * 200)
    assert busy.in_flight_context == 400
    nxt = choose(REQUEST, second, routing.policy("t"), now_s=100.002).candidates[0]
    assert nxt.backend != picked.backend  # the next request goes to the idle box, not the same one
    other = second.deployments[f"m@{nxt.backend}"]
    assert other is first.deployments[f"m@{nxt.backend}"]  # the untouched deployment is not rebuilt
    routing.stats.prefill_done(f"m@{picked.backend}", 400)
    routing.stats.request_finished(f"m@{picked.backend}")
    third = routing.snapshot(100.003)
    idle = third.deployments[f"m@{picked.backend}"][1]
    assert (idle.in_flight, idle.pending_prompt_tokens, idle.pending_prompt_context) == (0, 0, 0.0)
    # A rebuild after the interval reads the same counts from the stats themselves.
    again = routing.snapshot(100.2).deployments[f"m@{picked.backend}"][1]
    assert (again.in_flight, again.pending_prompt_tokens, again.pending_prompt_context) == (0, 0, 0.0)


def test_requests_that_run_later_than_predicted_raise_the_tail_factor() -> None:
    routing = state()
    dep = Deployment("m", "b0", BackendKind.OPENAI, "up", FREE)
    for i in range(TAIL_MIN_SAMPLES):
        use = DeploymentUse.begin(dep, "m", routing, float(i), 400, predicted_ttft_ms=100.0)
        use.prefilled()
        use.finish(ok=True, counted=True, now_s=i + 0.5, ttft_ms=250.0, completion_tokens=10)
        factor = routing.snapshot(1000.0 + i).deployments["m@b0"][1].ttft_tail_factor
        assert factor == pytest.approx(lateness(250.0, 100.0) if i + 1 >= TAIL_MIN_SAMPLES else 1.0)
    # Without a prediction (a fixed route) or without a first token, nothing is added.
    use = DeploymentUse.begin(dep, "m", routing, 50.0, 400)
    use.finish(ok=True, counted=True, now_s=51.0, ttft_ms=5000.0, completion_tokens=10)
    assert routing.snapshot(2000.0).deployments["m@b0"][1].ttft_tail_factor == pytest.approx(
        lateness(250, 100)
    )
    assert routing.snapshot(2000.0).deployments["m@b1"][1].ttft_tail_factor == 1.0


def test_each_attempt_is_measured_against_what_routing_predicted_for_its_deployment() -> None:
    routing = state()
    snapshot = routing.snapshot(0.0)
    decision = choose(REQUEST, snapshot, routing.policy("t"), now_s=0.0)
    for c in decision.ranked:
        assert _predicted_ttft_ms(decision, c.deployment) == c.ttft_ms > 0
    elsewhere = Deployment("m", "nowhere", BackendKind.OPENAI, "up", FREE)
    assert _predicted_ttft_ms(decision, elsewhere) == 0.0


def test_a_conversation_counts_on_its_engine_cache_only_until_that_much_was_written_there() -> None:
    routing = state({**CURVE, "kv_cache_tokens": 4000})
    dep = Deployment("m", "b0", BackendKind.OPENAI, "up", FREE)
    turn = DeploymentUse.begin(dep, "m", routing, 0.0, 900)
    routing.prefix_holders.record(42, "m@b0", routing.stats.kv_written_of("m@b0"))
    turn.prefilled()
    turn.finish(ok=True, counted=True, now_s=1.0, ttft_ms=100.0, completion_tokens=100)
    assert routing.prefix_holder(42, "m") == "m@b0"  # its own answer (100 tokens) is within the cache's half
    for i in range(2):  # other requests write 2 x (800 + 150) = 1900 more: still within 2000
        other = DeploymentUse.begin(dep, "m", routing, 2.0 + i, 800)
        other.finish(ok=True, counted=True, now_s=3.0 + i, ttft_ms=100.0, completion_tokens=150)
    assert routing.prefix_holder(42, "m") == "m@b0"
    DeploymentUse.begin(dep, "m", routing, 9.0, 100)  # 2100 written since: past half the 4000-token cache
    assert routing.prefix_holder(42, "m") is None
    # Writes elsewhere do not count, and a box without a known cache size always holds it.
    routing.prefix_holders.record(7, "m@b1", routing.stats.kv_written_of("m@b1"))
    assert routing.prefix_holder(7, "m") == "m@b1"
    assert routing.prefix_holder(None, "m") is None and routing.prefix_holder(99, "m") is None
    plain = state()
    plain.prefix_holders.record(5, "m@b0", 0)
    DeploymentUse.begin(dep, "m", plain, 0.0, 10**6)
    assert plain.prefix_holder(5, "m") == "m@b0"


def test_a_turn_after_cloud_turns_counts_on_what_its_engine_served_not_on_the_whole_history() -> None:
    from backends.base import ChatRequest
    from gateway.pipeline.plan import estimate_prompt_tokens, plan

    routing = state()
    system = {"role": "system", "content": "You are the migration agent. Follow the runbook. " * 40}

    def turn(n: int) -> ChatRequest:  # the system prompt, then n user/assistant exchanges and a question
        history: list[dict[str, str]] = []
        for i in range(n):
            history += [
                {"role": "user", "content": f"step {i} " * 30},
                {"role": "assistant", "content": "ok " * 40},
            ]
        messages = (system, *history, {"role": "user", "content": f"step {n} " * 30})
        return ChatRequest("m", messages, f"r{n}", max_tokens=50)

    first = plan(routing, "t", turn(0), now_s=0.0)
    assert first.prefix_key is not None and first.messages == 2
    # Served on b0: it holds the opening's 2 messages and the reply. Then two turns go to the cloud.
    routing.prefix_holders.record(first.prefix_key, "m@b0", 0, messages=first.messages + 1)
    routing.prefix_holders.record(first.prefix_key, None)
    routing.prefix_holders.record(first.prefix_key, None)
    later = turn(3)
    routed = plan(routing, "t", later, now_s=1.0)
    held = estimate_prompt_tokens(later.messages[:3])
    assert routed.prefix_cached == ("b0", held)
    assert held < estimate_prompt_tokens(later.messages[:-1])  # not the whole history, which b0 never saw


def test_public_models_on_one_box_share_its_load_and_its_prefix_cache() -> None:
    backends = {n: ScriptedBackend(n, "ok") for n in ("gpu", "cloud")}
    box = {**CURVE, "kv_cache_tokens": 2000}  # a held prefix survives ~1000 tokens written after it
    owned = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "usd_per_hour": 1, "capacity": box}
    cloud = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
    both = [{"backend": "gpu", "upstream_model": "up"}, {"backend": "cloud", "upstream_model": "c"}]
    config = parse_config(
        {
            "backends": {"gpu": owned, "cloud": cloud},
            "models": {"m": {"deployments": both}, "auto": {"deployments": both}},
        }
    )
    deps = {
        name: tuple(Deployment(name, b, BackendKind.OPENAI, "up", FREE) for b in ("gpu", "cloud"))
        for name in ("m", "auto")
    }
    routing = RoutingState(config, build_specs(config, backends, deps))
    routing.snapshot(100.0)
    routing.stats.request_started("m@gpu", 400, 1000)  # after 1,000 tokens it expects cached there
    routing.stats.request_started("auto@gpu", 300)
    routing.stats.request_started("m@cloud", 50)
    for when in (100.001, 100.2):  # patched between rebuilds, then rebuilt
        deployments = routing.snapshot(when).deployments
        for name in ("m", "auto"):
            stats = deployments[f"{name}@gpu"][1]
            assert (stats.in_flight, stats.pending_prompt_tokens) == (2, 700)  # the box's, whichever name
            assert stats.pending_prompt_context == 400 * 1200 + 300 * 150
    deployments = routing.snapshot(100.2).deployments
    assert deployments["m@cloud"][1].in_flight == 1 and deployments["auto@cloud"][1].in_flight == 0  # apart
    routing.stats.request_finished("auto@gpu", 300)
    assert routing.snapshot(100.201).deployments["m@gpu"][1].in_flight == 1
    # A conversation held on the box under one name is evicted by what the other name writes there too.
    routing.prefix_holders.record(7, "m@gpu", routing.boxes.written(routing.stats, "m@gpu"))
    routing.stats.request_started("auto@gpu", 800)
    assert routing.prefix_holder(7, "m") == "m@gpu"
    # The next turn asks for the box under the other name: the same box holds it, as that name's deployment.
    assert routing.prefix_holder(7, "auto") == "auto@gpu" and routing.prefix_holder(7, "other") is None
    routing.stats.request_started("auto@gpu", 300)
    assert routing.prefix_holder(7, "m") is None and routing.prefix_holder(7, "auto") is None
