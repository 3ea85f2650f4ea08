"""The chat completion service: admission (model access, route, limits), cache, dispatch, one usage record.

Every request that passed authentication ends in exactly one `UsageRecord`, whether it succeeded, was served
from the cache, was refused by a limit, failed in a backend, or was cut by the client; `_Recorder.finish` is
idempotent so no path writes two, and it settles the request's limits and budget reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from backends.base import ChatRequest, ChatResult, StreamChunk, Usage
from backends.errors import SwitchboardError
from gateway.cache.policy import CACHE_HEADER, CachePlan, plan_cache, servable
from gateway.cache.store import CachedResponse, entry_from_chunks, entry_from_result
from gateway.errors import AllBackendsFailed, error_body
from gateway.http.auth import check_model
from gateway.http.context import Timing
from gateway.limits.gate import Ticket
from gateway.live.state import deployment_id
from gateway.pipeline import dispatch
from gateway.pipeline import plan as route
from gateway.pipeline.plan import Routed, candidates_json, privacy_class
from gateway.records import KeyIdentity, RequestStatus, UsageRecord
from gateway.services import Services
from gateway.translate.openai_chat import (
    SSE_DONE,
    ChatCompletionBody,
    render_chunk,
    render_completion,
    render_sse_error,
    render_usage_chunk,
)
from routing.decision import Deployment

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True)
class _Recorder:
    svc: Services
    identity: KeyIdentity
    body: ChatCompletionBody
    timing: Timing
    received_at: dt.datetime
    deployment: Deployment | None = None
    ttft_ms: float | None = None
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    routed: Routed | None = None
    attempts: int = 0
    attempt_started_s: float | None = None  # perf_counter at the start of the successful attempt
    ticket: Ticket | None = None  # limits and budget held by this request, settled by `finish`
    hit: CachedResponse | None = None  # served from the cache
    cost_micro_usd: int = 0
    done: bool = False

    def finish(
        self,
        status: RequestStatus,
        http_status: int,
        usage: Usage = Usage(),
        *,
        served_model: str | None = None,
        error: SwitchboardError | None = None,
        backend: str | None = None,
    ) -> None:
        if self.done:
            return
        self.done = True
        dep, hit = self.deployment, self.hit
        cost = dep.price.cost_micro_usd(usage.prompt_tokens, usage.completion_tokens) if dep else 0
        self.cost_micro_usd = cost
        if hit is not None:
            backend = hit.backend
        rec = UsageRecord(
            request_id=self.timing.request_id,
            created_at=self.received_at,
            team=self.identity.team,
            key_id=self.identity.key_id,
            requested_model=self.body.model,
            backend=backend or (dep.backend if dep else None),
            served_model=served_model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_micro_usd=cost,
            latency_ms=round(self.timing.elapsed_ms(), 3),
            ttft_ms=None if self.ttft_ms is None else round(self.ttft_ms, 3),
            status=status,
            http_status=http_status,
            error_type=error.code if error else None,
            stream=self.body.stream,
            cache_hit=hit is not None,
            cost_saved_micro_usd=hit.cost_micro_usd if hit is not None else 0,
            privacy_class=privacy_class(self.routed.verdict) if self.routed else None,
            route_reason=self.routed.decision.reason if self.routed else None,
            attempts=self.attempts or (len(error.causes) if isinstance(error, AllBackendsFailed) else 0),
            route_candidates=candidates_json(self.routed.decision) if self.routed else None,
        )
        self.svc.ledger.record(rec)
        self.svc.metrics.observe(rec)
        if self.ticket is not None:
            # A hit used no model tokens: what admission reserved for it is handed back.
            tokens = 0 if hit is not None else usage.prompt_tokens + usage.completion_tokens
            self.svc.gate.settle_soon(self.ticket, tokens=tokens, cost_micro_usd=cost)
        if dep is not None:
            self._feed_routing(dep, status, usage, error)

    def _feed_routing(
        self, dep: Deployment, status: RequestStatus, usage: Usage, error: SwitchboardError | None
    ) -> None:
        """The served attempt's outcome, for live stats and the circuit breaker (failed attempts are fed by
        dispatch)."""
        routing = self.svc.routing
        dep_id = deployment_id(self.body.model, dep.backend)
        now_s = time.monotonic()
        routing.stats.request_finished(dep_id)
        if status is RequestStatus.CLIENT_CLOSED or (error is not None and not error.retryable):
            routing.breakers.release(dep_id, now_s)
            return
        started = self.attempt_started_s or self.timing.start_s
        since_start_ms = (time.perf_counter() - started) * 1000
        ttft_ms = None
        if self.ttft_ms is not None:
            ttft_ms = max(0.0, self.ttft_ms - (started - self.timing.start_s) * 1000)
        routing.stats.observe_request(
            dep_id,
            now_s=now_s,
            ok=error is None,
            latency_ms=since_start_ms,
            ttft_ms=ttft_ms,
            completion_tokens=usage.completion_tokens,
        )
        if error is None:
            routing.breakers.record_success(dep_id, now_s)
        else:
            routing.breakers.record_failure(dep_id, now_s)

    def fail(self, exc: SwitchboardError) -> None:
        backend = exc.causes[-1][0] if isinstance(exc, AllBackendsFailed) else None
        self.finish(RequestStatus.ERROR, exc.status_code, error=exc, backend=backend)


def _chat_request(svc: Services, body: ChatCompletionBody, request_id: str) -> ChatRequest:
    return ChatRequest(
        model=body.model,
        messages=tuple(m.model_dump(exclude_none=True) for m in body.messages),
        request_id=request_id,
        max_tokens=body.max_output_tokens(),
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_tuple(),
        seed=body.seed,
        user=body.user,
        tools=tuple(body.tools) if body.tools is not None else None,
        tool_choice=body.tool_choice,
        response_format=body.response_format,
        timeout_s=svc.config.server.request_timeout_s,
    )


@contextlib.contextmanager
def _recording_failures(rec: _Recorder) -> Iterator[None]:
    """Admission and dispatch failures still leave their one usage record."""
    try:
        yield
    except SwitchboardError as exc:
        rec.fail(exc)
        raise
    except asyncio.CancelledError:
        rec.finish(RequestStatus.CLIENT_CLOSED, 499)
        raise


@dataclass(frozen=True, slots=True)
class _Admitted:
    request: ChatRequest
    routed: Routed
    cache: CachePlan | None
    hit: CachedResponse | None


async def _admit(svc: Services, rec: _Recorder, hints: route.Hints, headers: Mapping[str, str]) -> _Admitted:
    """Model access, route, rate limits, then the cache; on a miss, the budget reservation."""
    body, team, out = rec.body, rec.identity.team, rec.timing.headers
    await check_model(svc, rec.identity, body.model)
    request = _chat_request(svc, body, rec.timing.request_id)
    routed = route.plan(svc.routing, team, body, request.messages, hints, now_s=time.monotonic())
    rec.routed = routed  # recorded even when it fails closed below
    refused = route.fail_closed_error(routed, team)
    if refused is not None:
        out.append((b"x-switchboard-route", _header_text(routed.decision.reason)))
        raise refused
    prompt_tokens, output_tokens = routed.prompt_tokens, routed.output_tokens
    rec.ticket = await svc.gate.admit(rec.identity, body.model, prompt_tokens + output_tokens, out)
    plan = plan_cache(svc.config, team, body, headers.get("cache-control"), headers.get(CACHE_HEADER))
    hit = await svc.cache.get(plan.key) if plan is not None and plan.read else None
    if hit is not None and servable(hit, routed):
        rec.hit = hit
        out.append((b"x-switchboard-route", _header_text(hit.route_reason)))
        out.append((b"x-switchboard-backend", _header_text(hit.backend)))
        out.append((CACHE_HEADER.encode(), b"hit"))
        svc.metrics.cache.labels(team, "hit").inc()
        return _Admitted(request, routed, plan, hit)
    out.append((b"x-switchboard-route", _header_text(routed.decision.reason)))
    out.append((CACHE_HEADER.encode(), b"skip" if plan is None else b"miss"))
    svc.metrics.cache.labels(team, "skip" if plan is None else "miss").inc()
    estimate = max(d.price.cost_micro_usd(prompt_tokens, output_tokens) for d in routed.decision.candidates)
    await svc.gate.reserve(rec.ticket, estimate)
    return _Admitted(request, routed, plan, None)


def _header_text(text: str, limit: int = 200) -> bytes:
    return text[:limit].encode("ascii", "replace")


def _plan(svc: Services, routed: Routed) -> dispatch.Plan:
    return dispatch.Plan(
        backends=svc.dispatch_backends,
        timeouts_s=svc.backend_timeouts_s,
        routing=svc.routing,
        max_attempts=routed.policy.max_attempts,
        budget_s=svc.config.server.request_timeout_s,
        backoff_s=svc.config.routing.retry_backoff_s,
        max_wait_s=svc.config.routing.max_retry_wait_s,
    )


def _served(rec: _Recorder, dep: Deployment, attempts: int, started_s: float) -> None:
    rec.deployment = dep
    rec.attempts = attempts
    rec.attempt_started_s = started_s
    rec.timing.headers.append((b"x-switchboard-backend", _header_text(dep.backend)))


async def complete(
    svc: Services,
    identity: KeyIdentity,
    body: ChatCompletionBody,
    timing: Timing,
    received_at: dt.datetime,
    hints: route.Hints = route.NO_HINTS,
    headers: Mapping[str, str] = _NO_HEADERS,
) -> bytes:
    """A whole (non-streamed) completion, rendered as the response body."""
    rec = _Recorder(svc, identity, body, timing, received_at)
    with _recording_failures(rec):
        admitted = await _admit(svc, rec, hints, headers)
        if admitted.hit is not None:
            result = admitted.hit.to_result()
            rec.finish(RequestStatus.OK, 200, result.usage, served_model=result.served_model)
            return _render(result, rec)
        routed = admitted.routed
        served = await dispatch.complete(routed.decision, admitted.request, timing, _plan(svc, routed))
    _served(rec, served.deployment, served.attempts, served.started_s)
    result = served.result
    rec.finish(RequestStatus.OK, 200, result.usage, served_model=result.served_model)
    plan = admitted.cache
    if plan is not None and plan.write:
        entry = entry_from_result(
            result,
            backend=served.deployment.backend,
            cost_micro_usd=rec.cost_micro_usd,
            route_reason=routed.decision.reason,
        )
        await svc.cache.put(plan.key, entry, plan.ttl_s)
    return _render(result, rec)


def _render(result: ChatResult, rec: _Recorder) -> bytes:
    return render_completion(
        result, request_id=rec.timing.request_id, model=rec.body.model, created=int(time.time())
    )


async def open_stream(
    svc: Services,
    identity: KeyIdentity,
    body: ChatCompletionBody,
    timing: Timing,
    received_at: dt.datetime,
    hints: route.Hints = route.NO_HINTS,
    headers: Mapping[str, str] = _NO_HEADERS,
) -> SseStream:
    """Dispatch until the first chunk arrives (errors so far become HTTP errors), then stream SSE bytes."""
    rec = _Recorder(svc, identity, body, timing, received_at)
    with _recording_failures(rec):
        admitted = await _admit(svc, rec, hints, headers)
        if admitted.hit is not None:
            replay = _Replay(admitted.hit)
            return SseStream(rec, None, _sse(svc, rec, await replay.next(), replay.next, None))
        opened = await dispatch.open_stream(
            admitted.routed.decision, admitted.request, timing, _plan(svc, admitted.routed)
        )
    _served(rec, opened.deployment, opened.attempts, opened.started_s)
    timeouts = svc.backend_timeouts_s
    idle_timeout_s = timeouts.get(opened.deployment.backend, svc.config.server.request_timeout_s)

    def next_chunk() -> Awaitable[StreamChunk]:
        return dispatch.next_chunk(opened, idle_timeout_s)

    plan = admitted.cache
    keep = _Keep(plan, admitted.routed.decision.reason) if plan is not None and plan.write else None
    return SseStream(rec, opened, _sse(svc, rec, opened.first, next_chunk, keep))


class _Replay:
    """A cached answer as the chunk source of a stream."""

    def __init__(self, entry: CachedResponse) -> None:
        self._chunks = entry.replay()

    async def next(self) -> StreamChunk:
        for chunk in self._chunks:
            return chunk
        raise StopAsyncIteration


@dataclass(slots=True)
class _Keep:
    """A streamed answer being collected for the cache."""

    plan: CachePlan
    route_reason: str
    chunks: list[StreamChunk] = field(default_factory=list)


@dataclass(slots=True)
class SseStream:
    """SSE bytes plus `finalize`, which the response calls however it ends (even if never iterated)."""

    rec: _Recorder
    opened: dispatch.OpenStream | None  # None when replayed from the cache
    body: AsyncGenerator[bytes, None]

    async def finalize(self) -> None:
        await self.body.aclose()
        if not self.rec.done:
            # The client went away mid-stream: record what was delivered so far.
            self.rec.finish(
                RequestStatus.CLIENT_CLOSED, 499, self.rec.usage, served_model=self.rec.served_model
            )
        if self.opened is not None:
            await dispatch.close_stream(self.opened.rest)


async def _sse(
    svc: Services,
    rec: _Recorder,
    first: StreamChunk,
    next_chunk: Callable[[], Awaitable[StreamChunk]],
    keep: _Keep | None,
) -> AsyncGenerator[bytes, None]:
    body, rid = rec.body, rec.timing.request_id
    created = int(time.time())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunk: StreamChunk | None = first
    try:
        while chunk is not None:
            rec.served_model = chunk.served_model or rec.served_model
            if chunk.usage is not None:
                rec.usage = chunk.usage
            if rec.ttft_ms is None and (chunk.delta.get("content") or chunk.delta.get("tool_calls")):
                rec.ttft_ms = rec.timing.elapsed_ms()  # first token, not the role-only opening chunk
            if keep is not None:
                keep.chunks.append(chunk)
            if chunk.delta or chunk.finish_reason:
                yield render_chunk(chunk, request_id=rid, model=body.model, created=created)
            try:
                chunk = await next_chunk()
            except StopAsyncIteration:
                chunk = None
    except SwitchboardError as exc:
        # Headers are gone: the error travels as an SSE event, which the OpenAI SDKs raise as APIError.
        rec.finish(RequestStatus.ERROR, exc.status_code, rec.usage, served_model=rec.served_model, error=exc)
        yield render_sse_error(error_body(exc))
        yield SSE_DONE
        return
    rec.finish(RequestStatus.OK, 200, rec.usage, served_model=rec.served_model)
    if keep is not None and rec.deployment is not None:
        entry = entry_from_chunks(
            keep.chunks,
            backend=rec.deployment.backend,
            cost_micro_usd=rec.cost_micro_usd,
            served_model=rec.served_model or "",
            route_reason=keep.route_reason,
        )
        if entry is not None:  # a stream that never finished is not kept
            await svc.cache.put(keep.plan.key, entry, keep.plan.ttl_s)
    if include_usage:
        yield render_usage_chunk(rec.usage, request_id=rid, model=body.model, created=created)
    yield SSE_DONE
