"""The one fallback loop: try the candidates of a route decision in rank order, with retries (tenacity).

Each attempt has its own timeout. Only errors marked `retryable` lead to another attempt: the next candidate
at once, or the same one again after a backoff that honours Retry-After, all within the request's budget.
Circuit breakers are consulted before and told after each attempt; failed attempts feed the live stats. When
every attempt fails, all causes are collected into one `AllBackendsFailed`. A stream may be retried only
until its first chunk has arrived. Time awaiting backends is added to `Timing.upstream_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from backends.base import Backend, ChatRequest, ChatResult, StreamChunk
from backends.errors import BackendTimeout, BackendUnavailable, SwitchboardError
from gateway.errors import AllBackendsFailed
from gateway.http.context import Timing
from gateway.live.state import RoutingState, deployment_id
from routing.decision import Deployment, RouteDecision

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Served:
    deployment: Deployment
    result: ChatResult
    attempts: int
    started_s: float  # when the successful attempt began (perf_counter)


@dataclass(slots=True)
class OpenStream:
    """A stream whose first chunk has arrived; `rest` yields the others."""

    deployment: Deployment
    first: StreamChunk
    rest: AsyncIterator[StreamChunk]
    attempts: int
    started_s: float


@dataclass(slots=True)
class Plan:
    """How hard to try: attempts in all, the time budget, the first backoff, and where outcomes go."""

    backends: Mapping[str, Backend]
    timeouts_s: Mapping[str, float]
    routing: RoutingState
    max_attempts: int = 3
    budget_s: float = 600.0
    backoff_s: float = 0.05
    max_wait_s: float = 2.0
    causes: list[tuple[str, SwitchboardError]] = field(default_factory=list)


def _for(request: ChatRequest, dep: Deployment) -> ChatRequest:
    return dataclasses.replace(request, model=dep.upstream_model)


def _timeout_error(dep: Deployment, timeout_s: float) -> BackendTimeout:
    return BackendTimeout(
        f"no answer within {timeout_s:g} s (config: backends.{dep.backend}.timeout_s or "
        "server.request_timeout_s)"
    )


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, SwitchboardError) and exc.retryable


def _wait(plan: Plan, candidates: tuple[Deployment, ...]) -> Callable[[RetryCallState], float]:
    """No wait when the next attempt goes elsewhere; else exponential backoff, at least Retry-After."""

    def wait(state: RetryCallState) -> float:
        done = state.attempt_number
        if len(candidates) > 1 and done % len(candidates) != 0:
            return 0.0
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after_s", None) or 0.0
        return max(retry_after, plan.backoff_s * 2 ** (done // len(candidates) - 1))

    return wait


async def _run_attempts(
    decision: RouteDecision,
    request: ChatRequest,
    timing: Timing,
    plan: Plan,
    attempt: Callable[[Deployment, ChatRequest], Awaitable[T]],
) -> tuple[Deployment, T, int, float]:
    candidates = decision.candidates
    deadline = time.perf_counter() + plan.budget_s
    number = 0

    def out_of_budget(state: RetryCallState) -> bool:
        if state.attempt_number >= plan.max_attempts:
            return True
        upcoming = _wait(plan, candidates)(state)
        return upcoming > plan.max_wait_s or time.perf_counter() + upcoming >= deadline

    async def one() -> tuple[Deployment, T, int, float]:
        nonlocal number
        dep = candidates[number % len(candidates)]
        number += 1
        started = time.perf_counter()
        try:
            return dep, await _attempt_once(dep, request, timing, plan, attempt, deadline), number, started
        finally:
            timing.upstream_s += time.perf_counter() - started

    retrying = AsyncRetrying(
        stop=out_of_budget, wait=_wait(plan, candidates), retry=retry_if_exception(_retryable), reraise=True
    )
    try:
        return await retrying(one)
    except SwitchboardError:
        raise AllBackendsFailed(plan.causes) from None


async def _attempt_once(
    dep: Deployment,
    request: ChatRequest,
    timing: Timing,
    plan: Plan,
    attempt: Callable[[Deployment, ChatRequest], Awaitable[T]],
    deadline: float,
) -> T:
    dep_id = deployment_id(request.model, dep.backend)
    routing = plan.routing
    now_s = time.monotonic()
    if not routing.breakers.allow(dep_id, now_s):
        refused = BackendUnavailable("circuit open after repeated failures (config: routing.breaker_open_s)")
        plan.causes.append((dep.backend, refused))
        raise refused
    timeout_s = max(
        0.0, min(plan.timeouts_s.get(dep.backend, request.timeout_s), deadline - time.perf_counter())
    )
    routing.stats.request_started(dep_id)
    started = time.perf_counter()
    err: SwitchboardError
    try:
        async with asyncio.timeout(timeout_s):
            return await attempt(dep, _for(request, dep))
    except TimeoutError:
        err = _timeout_error(dep, timeout_s)
    except SwitchboardError as exc:
        err = exc
    except BaseException:
        routing.stats.request_finished(dep_id)
        routing.breakers.release(dep_id, time.monotonic())
        raise
    routing.stats.request_finished(dep_id)
    now_s = time.monotonic()
    if err.retryable:
        routing.breakers.record_failure(dep_id, now_s)
        routing.stats.observe_request(
            dep_id, now_s=now_s, ok=False, latency_ms=(time.perf_counter() - started) * 1000
        )
    else:
        routing.breakers.release(dep_id, now_s)
    plan.causes.append((dep.backend, err))
    raise err


async def complete(decision: RouteDecision, request: ChatRequest, timing: Timing, plan: Plan) -> Served:
    async def attempt(dep: Deployment, req: ChatRequest) -> ChatResult:
        return await plan.backends[dep.backend].complete(req)

    dep, result, attempts, started = await _run_attempts(decision, request, timing, plan, attempt)
    return Served(dep, result, attempts, started)


async def open_stream(
    decision: RouteDecision, request: ChatRequest, timing: Timing, plan: Plan
) -> OpenStream:
    async def attempt(dep: Deployment, req: ChatRequest) -> tuple[StreamChunk, AsyncIterator[StreamChunk]]:
        iterator = plan.backends[dep.backend].stream(req).__aiter__()
        try:
            return await iterator.__anext__(), iterator
        except StopAsyncIteration:
            return StreamChunk(), iterator
        except BaseException:
            await close_stream(iterator)  # a failed or timed-out attempt must not leak its connection
            raise

    dep, (first, rest), attempts, started = await _run_attempts(decision, request, timing, plan, attempt)
    return OpenStream(dep, first, rest, attempts, started)


async def next_chunk(stream: OpenStream, timeout_s: float) -> StreamChunk:
    """The next chunk, or StopAsyncIteration. Converts an idle timeout into BackendTimeout."""
    try:
        async with asyncio.timeout(timeout_s):
            return await stream.rest.__anext__()
    except TimeoutError:
        raise _timeout_error(stream.deployment, timeout_s) from None


async def close_stream(iterator: AsyncIterator[StreamChunk]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
