"""The fallback loop, fed backends that answer as told (no I/O): order, retryable or not, timeouts."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from backends.base import BackendKind, ChatRequest, StreamChunk, Usage
from backends.errors import (
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    SwitchboardError,
)
from gateway.config import parse_config
from gateway.eager import Paused, Ready
from gateway.errors import AllBackendsFailed
from gateway.live.state import RoutingState, build_specs
from gateway.pipeline import dispatch
from gateway.pipeline.request import Clock, Timing
from routing.decision import FREE, Deployment, RouteDecision
from tests.support.scripted import ScriptedBackend


def setup(
    *outcomes: SwitchboardError | float | str,
    max_attempts: int | None = None,
    timeouts_s: dict[str, float] | None = None,
) -> tuple[RouteDecision, dict[str, ScriptedBackend], dispatch.Plan]:
    backends = {f"b{i}": ScriptedBackend(f"b{i}", o) for i, o in enumerate(outcomes)}
    config = parse_config(
        {
            "backends": {name: {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"} for name in backends},
            "models": {"m": {"deployments": [{"backend": n, "upstream_model": f"up-{n}"} for n in backends]}},
            "teams": {"t": {}},
        }
    )
    deps = tuple(Deployment("m", name, BackendKind.OPENAI, f"up-{name}", FREE) for name in backends)
    routing = RoutingState(config, build_specs(config, backends, {"m": deps}))
    plan = dispatch.Plan(
        backends=backends,
        timeouts_s=timeouts_s or {},
        routing=routing,
        max_attempts=max_attempts or len(backends),
        budget_s=5.0,
        backoff_s=0.01,
    )
    return RouteDecision("m", deps, "test"), backends, plan


REQUEST = ChatRequest(model="m", messages=({"role": "user", "content": "x"},), request_id="r1", timeout_s=5)


def timing() -> Timing:
    return Timing(start_s=0.0, request_id="r1")


async def test_falls_back_on_retryable_error_and_counts_attempts() -> None:
    decision, backends, plan = setup(BackendUnavailable("down"), "ok")
    served = await dispatch.complete(decision, REQUEST, timing(), plan)
    assert served.deployment.backend == "b1" and served.attempts == 2
    assert served.result.message["content"] == "ok"
    assert backends["b0"].calls == ["up-b0"] and backends["b1"].calls == ["up-b1"]


async def test_non_retryable_error_stops_the_loop() -> None:
    decision, backends, plan = setup(BackendRejected("bad request"), "ok")
    with pytest.raises(AllBackendsFailed) as info:
        await dispatch.complete(decision, REQUEST, timing(), plan)
    assert info.value.status_code == 400 and backends["b1"].calls == []


async def test_each_attempt_has_its_own_timeout_and_all_causes_are_kept() -> None:
    decision, backends, plan = setup(1.0, BackendUnavailable("down"), timeouts_s={"b0": 0.05})
    t = timing()
    with pytest.raises(AllBackendsFailed) as info:
        await dispatch.complete(decision, REQUEST, t, plan)
    assert [name for name, _ in info.value.causes] == ["b0", "b1"]
    assert "backends.b0.timeout_s" in info.value.message and "down" in info.value.message
    assert info.value.status_code == 503
    assert t.upstream_s >= 0.05


async def test_stream_falls_back_before_first_chunk() -> None:
    decision, backends, plan = setup(BackendUnavailable("down"), "hello")
    opened = await dispatch.open_stream(decision, REQUEST, timing(), plan)
    assert opened.deployment.backend == "b1" and opened.first.delta == {"content": "hello"}
    rest = [chunk async for chunk in opened.rest]
    assert rest[-1].usage == Usage(1, 1)


async def test_a_request_counts_its_prompt_as_pending_prefill_until_its_first_token() -> None:
    decision, backends, plan = setup(BackendUnavailable("down"), 0.2)
    plan = dataclasses.replace(plan, prompt_tokens=700)
    stats = plan.routing.stats
    task = asyncio.create_task(dispatch.complete(decision, REQUEST, timing(), plan))
    await asyncio.sleep(0.05)  # b0 failed (gave its tokens back), b1 is working on a whole answer
    now = stats.snapshot(0.0)
    assert (now["m@b0"].pending_prompt_tokens, now["m@b1"].pending_prompt_tokens) == (0, 700)
    served = await task
    assert stats.snapshot(0.0)["m@b1"].pending_prompt_tokens == 700  # until the pipeline ends the use
    served.use.finish(ok=True, counted=True, now_s=1.0)
    assert stats.snapshot(1.0)["m@b1"].pending_prompt_tokens == 0

    decision, backends, plan = setup("hello")
    plan = dataclasses.replace(plan, prompt_tokens=700, prefix_cached=("b0", 600))  # b0 holds 600 of them
    opened = await dispatch.open_stream(decision, REQUEST, timing(), plan)  # a stream: at its first token
    now = plan.routing.stats.snapshot(0.0)["m@b0"]
    assert (now.pending_prompt_tokens, now.pending_prompt_context, now.in_flight) == (0, 0.0, 1)
    assert now.in_flight_context == 700  # the whole prompt, cached tokens included, until the end
    opened.use.finish(ok=True, counted=True, now_s=1.0)
    after = plan.routing.stats.snapshot(1.0)["m@b0"]
    assert (after.in_flight, after.in_flight_context) == (0, 0)


async def test_a_prompt_pending_after_a_cached_prefix_counts_its_attention_from_there() -> None:
    decision, backends, plan = setup(0.2)
    plan = dataclasses.replace(plan, prompt_tokens=700, prefix_cached=("b0", 600))
    task = asyncio.create_task(dispatch.complete(decision, REQUEST, timing(), plan))
    await asyncio.sleep(0.05)
    now = plan.routing.stats.snapshot(0.0)["m@b0"]
    assert (now.pending_prompt_tokens, now.pending_prompt_context) == (100, 100 * 650)  # after 600 cached
    assert now.in_flight_context == 700
    served = await task
    served.use.finish(ok=True, counted=True, now_s=1.0)
    after = plan.routing.stats.snapshot(1.0)["m@b0"]
    assert (after.pending_prompt_tokens, after.pending_prompt_context, after.in_flight_context) == (0, 0.0, 0)


class FakeClock:
    """Monotonic time that only sleeps move: backoff is checked without waiting for it."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now_s(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    def clock(self) -> Clock:
        return Clock(now_s=self.now_s, sleep=self.sleep)


async def test_retries_the_same_deployment_with_backoff_honouring_retry_after() -> None:
    decision, backends, plan = setup(BackendRateLimited("busy", retry_after_s=0.2), max_attempts=3)
    fake = FakeClock()
    plan.clock = fake.clock()
    with pytest.raises(AllBackendsFailed) as info:
        await dispatch.complete(decision, REQUEST, timing(), plan)
    assert backends["b0"].calls == ["up-b0", "up-b0", "up-b0"]
    assert fake.slept == [0.2, 0.2]  # Retry-After beats the 0.01 s and 0.02 s backoff
    assert len(info.value.causes) == 3 and info.value.status_code == 429


async def test_backoff_doubles_on_a_fake_clock_and_stops_at_the_budget() -> None:
    decision, backends, plan = setup(BackendUnavailable("down"), max_attempts=10)
    plan.backoff_s, plan.max_wait_s, plan.budget_s = 0.5, 10.0, 6.0
    fake = FakeClock()
    plan.clock = fake.clock()
    with pytest.raises(AllBackendsFailed):
        await dispatch.complete(decision, REQUEST, timing(), plan)
    # 0.5 + 1 + 2 = 3.5 s slept; the next wait (4 s) would end past the 6 s budget, so it stops there.
    assert fake.slept == [0.5, 1.0, 2.0] and len(backends["b0"].calls) == 4


async def test_a_long_retry_after_goes_back_to_the_client_at_once() -> None:
    decision, backends, plan = setup(BackendRateLimited("busy", retry_after_s=30), max_attempts=3)
    with pytest.raises(AllBackendsFailed) as info:
        await dispatch.complete(decision, REQUEST, timing(), plan)
    assert backends["b0"].calls == ["up-b0"] and info.value.retry_after_s == 30


async def test_circuit_opens_after_repeated_failures_and_is_skipped() -> None:
    decision, backends, plan = setup(BackendUnavailable("down"), "ok", max_attempts=2)
    for _ in range(5):  # routing.breaker_failures defaults to 5
        await dispatch.complete(decision, REQUEST, timing(), plan)
    assert len(backends["b0"].calls) == 5
    served = await dispatch.complete(decision, REQUEST, timing(), plan)
    assert served.deployment.backend == "b1" and len(backends["b0"].calls) == 5  # b0's circuit is open
    assert any("circuit open" in err.message for _, err in plan.causes)


async def test_a_buffered_chunk_needs_no_timer_and_a_stalled_one_times_out() -> None:
    decision, _, plan = setup("hello")
    opened = await dispatch.open_stream(decision, REQUEST, timing(), plan)
    closed: list[bool] = []

    async def stalls_after_one() -> AsyncIterator[StreamChunk]:
        try:
            yield StreamChunk(delta={"content": "ready"})
            await asyncio.sleep(10)
            yield StreamChunk(delta={"content": "never"})
        finally:
            closed.append(True)

    stalled = dataclasses.replace(opened, rest=stalls_after_one())
    ready = dispatch.ready_chunk(stalled)
    assert isinstance(ready, Ready) and ready.value.delta == {"content": "ready"}  # no timer, no loop turn
    waiting = dispatch.ready_chunk(stalled)
    assert isinstance(waiting, Paused)
    t0 = time.perf_counter()
    with pytest.raises(BackendTimeout, match="b0"):
        await dispatch.await_chunk(stalled, waiting, 0.05)
    assert time.perf_counter() - t0 < 5
    await stalled.rest.aclose()  # type: ignore[attr-defined]
    assert closed == [True]


ROLE_CHUNK = StreamChunk(delta={"role": "assistant", "content": ""})


class OpensThen(ScriptedBackend):
    """Sends the role-only opening chunk at once (as our engine and vLLM do), then does `outcome`: stalls
    (a float), dies (an error) or answers (a text)."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        yield ROLE_CHUNK
        async for chunk in super().stream(request):
            yield chunk


def with_opening(plan: dispatch.Plan, backends: dict[str, ScriptedBackend], name: str) -> None:
    backends[name] = OpensThen(name, backends[name].outcome)
    plan.backends = {**plan.backends, name: backends[name]}


@pytest.mark.parametrize("first", [10.0, BackendTimeout("queued"), BackendUnavailable("killed")])
async def test_a_stream_that_opened_but_sent_no_token_still_falls_back(first: float | Exception) -> None:
    decision, backends, plan = setup(first, "hello", timeouts_s={"b0": 0.05})  # type: ignore[arg-type]
    with_opening(plan, backends, "b0")
    opened = await dispatch.open_stream(decision, REQUEST, timing(), plan)
    assert opened.deployment.backend == "b1" and opened.attempts == 2
    assert backends["b0"].calls == ["up-b0"]
    assert [b for b, _ in plan.causes] == ["b0"]


async def test_the_held_opening_chunk_reaches_the_client_before_the_first_token() -> None:
    decision, backends, plan = setup("hello world")
    with_opening(plan, backends, "b0")
    opened = await dispatch.open_stream(decision, REQUEST, timing(), plan)
    assert opened.first == ROLE_CHUNK and opened.held == (StreamChunk(delta={"content": "hello wo"}),)
    rest = [chunk async for chunk in opened.rest]
    assert rest[0].delta == {"content": "rld"} and rest[-1].usage == Usage(1, 1)


async def test_a_server_sending_only_empty_chunks_is_taken_as_started_after_a_few() -> None:
    decision, backends, plan = setup("x")

    class Chatty(ScriptedBackend):
        async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
            for _ in range(50):
                yield ROLE_CHUNK
            await asyncio.sleep(10)
            yield StreamChunk(delta={"content": "late"})

    backends["b0"] = Chatty("b0", "x")
    plan.backends = backends
    opened = await dispatch.open_stream(decision, REQUEST, timing(), plan)
    assert opened.deployment.backend == "b0"
    assert len(opened.held) == dispatch.MAX_OPENING_CHUNKS
    await opened.rest.aclose()  # type: ignore[attr-defined]
