"""The one fallback loop: try the candidates of a route decision in rank order, with retries (tenacity).

Each attempt has its own timeout. Only errors marked `retryable` lead to another attempt: the next candidate
at once, or the same one again after a backoff that honours Retry-After, all within the request's budget.
When every attempt fails, all causes are collected into one `AllBackendsFailed`. A stream may be retried
until its first token: the role-only chunk servers send before generating (our engine, vLLM, OpenAI) is held,
so a server that queues, stalls or dies before answering is fallen back from within the attempt's timeout
(time awaiting backends is added to `Timing.upstream_s`). `DeploymentUse` (`gateway/pipeline/attempt.py`)
is the one owner of a request's life on a deployment: it takes the in-flight count and pending prompt
tokens, and it alone gives them back and tells the live stats and the circuit breaker how the attempt
ended. Failed attempts end here; the served one ends when the pipeline has the whole answer
(`DeploymentUse.finish`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from backends.base import (
    Backend,
    ChatRequest,
    ChatResult,
    EmbeddingBackend,
    EmbeddingRequest,
    EmbeddingResult,
    StreamChunk,
)
from backends.errors import (
    BackendMisconfigured,
    BackendTimeout,
    BackendUnavailable,
    SwitchboardError,
    loggable_detail,
)
from gateway.eager import Paused, Ready, run_until_wait
from gateway.errors import AllBackendsFailed
from gateway.live.state import RoutingState, deployment_id
from gateway.pipeline.attempt import DeploymentUse
from gateway.pipeline.request import SYSTEM_CLOCK, Call, Clock, Timing
from gateway.telemetry.base import AttemptMark
from routing.decision import Deployment, RouteDecision

T = TypeVar("T")
C = TypeVar("C", ChatRequest, EmbeddingRequest)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    use: DeploymentUse
    result: ChatResult | EmbeddingResult
    attempts: int

    @property
    def deployment(self) -> Deployment:
        return self.use.deployment


@dataclass(slots=True)
class OpenStream:
    """A stream whose first token has arrived: `first`, then `held` (the chunks read after `first` before
    the stream was committed, the first token last), then what `rest` yields."""

    use: DeploymentUse
    first: StreamChunk
    rest: AsyncIterator[StreamChunk]
    attempts: int
    held: tuple[StreamChunk, ...] = ()

    @property
    def deployment(self) -> Deployment:
        return self.use.deployment


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
    clock: Clock = SYSTEM_CLOCK
    prompt_tokens: int = 0  # the estimate routing used: pending prefill on the deployment until a first token
    prefix_cached: tuple[str, int] = (
        "",
        0,
    )  # (backend, tokens) of it expected in that backend's prefix cache
    causes: list[tuple[str, SwitchboardError]] = field(default_factory=list)


def _for(request: C, dep: Deployment) -> C:
    if request.model == dep.upstream_model:  # the usual case: a frozen copy equal to it would cost ~3 us
        return request
    return dataclasses.replace(request, model=dep.upstream_model)


def _timeout_error(dep: Deployment, timeout_s: float) -> BackendTimeout:
    return BackendTimeout(
        f"no answer within {timeout_s:g} s (config: backends.{dep.backend}.timeout_s or "
        "server.request_timeout_s)"
    )


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, SwitchboardError) and exc.retryable


def _delay(plan: Plan, candidates: tuple[Deployment, ...], done: int, exc: BaseException | None) -> float:
    """After `done` attempts: no wait when the next goes elsewhere; else exponential backoff, at least
    Retry-After."""
    if len(candidates) > 1 and done % len(candidates) != 0:
        return 0.0
    retry_after = getattr(exc, "retry_after_s", None) or 0.0
    return max(retry_after, plan.backoff_s * 2 ** (done // len(candidates) - 1))


def _exhausted(
    plan: Plan, candidates: tuple[Deployment, ...], done: int, exc: BaseException | None, left_s: float
) -> bool:
    """Whether to stop after `done` attempts: out of attempts, or the next wait is too long for the budget."""
    if done >= plan.max_attempts:
        return True
    upcoming = _delay(plan, candidates, done, exc)
    return upcoming > plan.max_wait_s or upcoming >= left_s


def _error_of(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


async def _run_attempts(
    decision: RouteDecision,
    request: C,
    timing: Timing,
    plan: Plan,
    attempt: Callable[[Deployment, C], Awaitable[T]],
) -> tuple[DeploymentUse, T, int]:
    candidates, now_s = decision.candidates, plan.clock.now_s
    deadline = now_s() + plan.budget_s
    number = 0

    async def one() -> tuple[DeploymentUse, T, int]:
        nonlocal number
        dep = candidates[number % len(candidates)]
        number += 1
        started, error = now_s(), "cancelled"
        try:
            use, value = await _attempt_once(
                dep, request, plan, attempt, deadline, _predicted_ttft_ms(decision, dep)
            )
            error = ""
            return use, value, number
        except SwitchboardError as exc:
            error = exc.code
            raise
        finally:
            ended = now_s()
            timing.upstream_s += ended - started
            if timing.attempts is not None:  # a tracer wants the attempts
                timing.attempts.append(AttemptMark(dep, started, ended, error or None))

    # The first attempt runs outside tenacity: most requests succeed at once, and tenacity's bookkeeping
    # was ~7% of the gateway's CPU per request (py-spy, bench/overhead). Later attempts follow the same
    # rules through tenacity, their attempt numbers offset by the one made here.
    try:
        return await one()
    except SwitchboardError as exc:
        if not exc.retryable or _exhausted(plan, candidates, 1, exc, deadline - now_s()):
            raise AllBackendsFailed(plan.causes) from None
        first_wait_s = _delay(plan, candidates, 1, exc)
    if first_wait_s > 0:
        await plan.clock.sleep(first_wait_s)
    retrying = AsyncRetrying(
        stop=lambda s: _exhausted(plan, candidates, s.attempt_number + 1, _error_of(s), deadline - now_s()),
        wait=lambda s: _delay(plan, candidates, s.attempt_number + 1, _error_of(s)),
        retry=retry_if_exception(_retryable),
        reraise=True,
        sleep=plan.clock.sleep,
    )
    try:
        return await retrying(one)
    except SwitchboardError:
        raise AllBackendsFailed(plan.causes) from None


def _predicted_ttft_ms(decision: RouteDecision, dep: Deployment) -> float:
    """Routing's predicted TTFT on `dep` for this request; 0 when it ranked none (a fixed route)."""
    for c in decision.ranked:
        if c.deployment is dep:
            return c.ttft_ms
    return 0.0


async def _attempt_once(
    dep: Deployment,
    request: C,
    plan: Plan,
    attempt: Callable[[Deployment, C], Awaitable[T]],
    deadline: float,
    predicted_ttft_ms: float = 0.0,
) -> tuple[DeploymentUse, T]:
    routing, now_s = plan.routing, plan.clock.now_s
    if not routing.breakers.allow(deployment_id(request.model, dep.backend), now_s()):
        refused = BackendUnavailable("circuit open after repeated failures (config: routing.breaker_open_s)")
        plan.causes.append((dep.backend, refused))
        raise refused
    timeout_s = max(0.0, min(plan.timeouts_s.get(dep.backend, request.timeout_s), deadline - now_s()))
    cached_on, cached = plan.prefix_cached
    cached = cached if dep.backend == cached_on else 0
    use = DeploymentUse.begin(
        dep, request.model, routing, now_s(), plan.prompt_tokens - cached, predicted_ttft_ms, cached
    )
    err: SwitchboardError
    try:
        async with asyncio.timeout(timeout_s):
            return use, await attempt(dep, _for(request, dep))
    except TimeoutError:
        err = _timeout_error(dep, timeout_s)
    except SwitchboardError as exc:
        err = exc
    except BaseException:
        use.finish(ok=False, counted=False, now_s=now_s())
        raise
    use.fail(err, now_s())
    plan.causes.append((dep.backend, err))
    # The detail (upstream text, addresses) is for operators only; clients get `err.message`.
    log.warning(
        "request %s: backend %s failed (%s)%s",
        request.request_id,
        dep.backend,
        err.code,
        f": {loggable_detail(err.detail)}" if err.detail else "",
    )
    raise err


async def complete(decision: RouteDecision, request: ChatRequest, timing: Timing, plan: Plan) -> Served:
    async def attempt(dep: Deployment, req: ChatRequest) -> ChatResult:
        return await plan.backends[dep.backend].complete(req)

    use, result, attempts = await _run_attempts(decision, request, timing, plan, attempt)
    return Served(use, result, attempts)


async def embed(decision: RouteDecision, request: EmbeddingRequest, timing: Timing, plan: Plan) -> Served:
    """The same fallback loop, each attempt an `EmbeddingBackend.embed`."""

    async def attempt(dep: Deployment, req: EmbeddingRequest) -> EmbeddingResult:
        backend = plan.backends[dep.backend]
        if not isinstance(backend, EmbeddingBackend):  # config refuses this; a guard, not a route
            raise BackendMisconfigured(
                f"backend `{dep.backend}` cannot embed (config: models.{request.model}.mode)"
            )
        return await backend.embed(req)

    use, result, attempts = await _run_attempts(decision, request, timing, plan, attempt)
    return Served(use, result, attempts)


_Opened = tuple[list[StreamChunk], AsyncIterator[StreamChunk]]  # chunks up to the first token, the rest
MAX_OPENING_CHUNKS = 4  # a server that sends more empty chunks than this is taken to have started


def _opening(chunk: StreamChunk) -> bool:
    """A chunk that says nothing yet: a role and/or empty content, no finish, no usage."""
    delta = chunk.delta
    return (
        chunk.finish_reason is None
        and chunk.usage is None
        and not delta.get("content")
        and delta.keys() <= {"role", "content"}
    )


async def open_stream(
    decision: RouteDecision, request: ChatRequest, timing: Timing, plan: Plan
) -> OpenStream:
    async def attempt(dep: Deployment, req: ChatRequest) -> _Opened:
        iterator = plan.backends[dep.backend].stream(req).__aiter__()
        chunks: list[StreamChunk] = []
        try:
            chunks.append(await iterator.__anext__())
            while _opening(chunks[-1]) and len(chunks) <= MAX_OPENING_CHUNKS:
                chunks.append(await iterator.__anext__())  # within this attempt's timeout
            return chunks, iterator
        except StopAsyncIteration:
            return chunks or [StreamChunk()], iterator
        except BaseException:
            await close_stream(iterator)  # a failed or timed-out attempt must not leak its connection
            raise

    use, (chunks, rest), attempts = await _run_attempts(decision, request, timing, plan, attempt)
    use.prefilled()
    return OpenStream(use, chunks[0], rest, attempts, tuple(chunks[1:]))


def ready_chunk(stream: OpenStream) -> Ready[StreamChunk] | Paused[StreamChunk]:
    """The next chunk if it is buffered (no event-loop turn, no timer: arming one per chunk cost more than
    the chunk itself), else the read paused at its wait, for `await_chunk`. StopAsyncIteration at the end."""
    return run_until_wait(stream.rest.__anext__())


async def await_chunk(stream: OpenStream, step: Paused[StreamChunk], timeout_s: float) -> StreamChunk:
    """A chunk that has to be waited for. Converts an idle timeout into BackendTimeout."""
    try:
        async with asyncio.timeout(timeout_s):
            return await step
    except TimeoutError:
        raise _timeout_error(stream.deployment, timeout_s) from None


async def close_stream(iterator: AsyncIterator[StreamChunk]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


@dataclass(frozen=True, slots=True)
class RetrySettings:
    budget_s: float = 600.0  # server.request_timeout_s: all attempts of one request together
    backoff_s: float = 0.05  # routing.retry_backoff_s
    max_wait_s: float = 2.0  # routing.max_retry_wait_s


class Dispatcher:
    """The backends by the name a deployment carries (configured ones, and `edge/<node>` for edge nodes),
    their timeouts, and where attempts' outcomes go."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        timeouts_s: Mapping[str, float],
        routing: RoutingState,
        retry: RetrySettings,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.backends, self.timeouts_s, self.routing = backends, timeouts_s, routing
        self.retry, self.clock = retry, clock

    def plan(
        self, max_attempts: int, prompt_tokens: int = 0, prefix_cached: tuple[str, int] = ("", 0)
    ) -> Plan:
        r = self.retry
        return Plan(
            self.backends, self.timeouts_s, self.routing, max_attempts, r.budget_s, r.backoff_s, r.max_wait_s,
            self.clock, prompt_tokens, prefix_cached,
        )  # fmt: skip

    def idle_timeout_s(self, backend: str) -> float:
        return self.timeouts_s.get(backend, self.retry.budget_s)

    async def complete(
        self,
        decision: RouteDecision,
        request: Call,
        timing: Timing,
        max_attempts: int,
        prompt_tokens: int = 0,
        prefix_cached: tuple[str, int] = ("", 0),
    ) -> Served:
        """A whole answer: a chat completion, or the vectors of an embeddings call."""
        plan = self.plan(max_attempts, prompt_tokens, prefix_cached)
        if isinstance(request, EmbeddingRequest):
            return await embed(decision, request, timing, plan)
        return await complete(decision, request, timing, plan)

    async def open_stream(
        self,
        decision: RouteDecision,
        request: ChatRequest,
        timing: Timing,
        max_attempts: int,
        prompt_tokens: int = 0,
        prefix_cached: tuple[str, int] = ("", 0),
    ) -> OpenStream:
        plan = self.plan(max_attempts, prompt_tokens, prefix_cached)
        return await open_stream(decision, request, timing, plan)
