"""The chat completion service: admission (model access, capabilities), dispatch, one usage record.

Every request that passed authentication ends in exactly one `UsageRecord`, whether it succeeded, failed in a
backend, or was cut by the client; `_Recorder.finish` is idempotent so no path writes two.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field

from backends.base import ChatRequest, StreamChunk, Usage
from backends.errors import SwitchboardError
from gateway import dispatch, route
from gateway.access import check_model
from gateway.errors import AllBackendsFailed, error_body
from gateway.middleware import Timing
from gateway.records import KeyIdentity, RequestStatus, UsageRecord
from gateway.route import Routed, candidates_json, privacy_class
from gateway.routing_state import deployment_id
from gateway.services import Services
from gateway.wire import (
    SSE_DONE,
    ChatCompletionBody,
    render_chunk,
    render_completion,
    render_sse_error,
    render_usage_chunk,
)
from routing.decision import Deployment


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
        dep = self.deployment
        cost = dep.price.cost_micro_usd(usage.prompt_tokens, usage.completion_tokens) if dep else 0
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
            privacy_class=privacy_class(self.routed.verdict) if self.routed else None,
            route_reason=self.routed.decision.reason if self.routed else None,
            attempts=self.attempts or (len(error.causes) if isinstance(error, AllBackendsFailed) else 0),
            route_candidates=candidates_json(self.routed.decision) if self.routed else None,
        )
        self.svc.ledger.record(rec)
        self.svc.metrics.observe(rec)
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


async def _admit(svc: Services, rec: _Recorder, hints: route.Hints) -> tuple[ChatRequest, Routed]:
    await check_model(svc, rec.identity, rec.body.model)
    request = _chat_request(svc, rec.body, rec.timing.request_id)
    routed = route.plan(
        svc.routing, rec.identity.team, rec.body, request.messages, hints, now_s=time.monotonic()
    )
    rec.routed = routed  # recorded even when it fails closed below
    rec.timing.headers.append((b"x-switchboard-route", _header_text(routed.decision.reason)))
    refused = route.fail_closed_error(routed, rec.identity.team)
    if refused is not None:
        raise refused
    return request, routed


def _header_text(text: str, limit: int = 200) -> bytes:
    return text[:limit].encode("ascii", "replace")


def _plan(svc: Services, routed: Routed) -> dispatch.Plan:
    return dispatch.Plan(
        backends=svc.backends,
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
) -> bytes:
    """A whole (non-streamed) completion, rendered as the response body."""
    rec = _Recorder(svc, identity, body, timing, received_at)
    with _recording_failures(rec):
        request, routed = await _admit(svc, rec, hints)
        served = await dispatch.complete(routed.decision, request, timing, _plan(svc, routed))
    _served(rec, served.deployment, served.attempts, served.started_s)
    result = served.result
    rec.finish(RequestStatus.OK, 200, result.usage, served_model=result.served_model)
    return render_completion(result, request_id=timing.request_id, model=body.model, created=int(time.time()))


async def open_stream(
    svc: Services,
    identity: KeyIdentity,
    body: ChatCompletionBody,
    timing: Timing,
    received_at: dt.datetime,
    hints: route.Hints = route.NO_HINTS,
) -> SseStream:
    """Dispatch until the first chunk arrives (errors so far become HTTP errors), then stream SSE bytes."""
    rec = _Recorder(svc, identity, body, timing, received_at)
    with _recording_failures(rec):
        request, routed = await _admit(svc, rec, hints)
        opened = await dispatch.open_stream(routed.decision, request, timing, _plan(svc, routed))
    _served(rec, opened.deployment, opened.attempts, opened.started_s)
    return SseStream(rec, opened, _sse(svc, rec, opened))


@dataclass(slots=True)
class SseStream:
    """SSE bytes plus `finalize`, which the response calls however it ends (even if never iterated)."""

    rec: _Recorder
    opened: dispatch.OpenStream
    body: AsyncGenerator[bytes, None]

    async def finalize(self) -> None:
        await self.body.aclose()
        if not self.rec.done:
            # The client went away mid-stream: record what was delivered so far.
            self.rec.finish(
                RequestStatus.CLIENT_CLOSED, 499, self.rec.usage, served_model=self.rec.served_model
            )
        await dispatch.close_stream(self.opened.rest)


async def _sse(svc: Services, rec: _Recorder, opened: dispatch.OpenStream) -> AsyncGenerator[bytes, None]:
    body, rid = rec.body, rec.timing.request_id
    created = int(time.time())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunk: StreamChunk | None = opened.first
    idle_timeout_s = svc.backend_timeouts_s.get(
        opened.deployment.backend, svc.config.server.request_timeout_s
    )
    try:
        while chunk is not None:
            rec.served_model = chunk.served_model or rec.served_model
            if chunk.usage is not None:
                rec.usage = chunk.usage
            if rec.ttft_ms is None and (chunk.delta.get("content") or chunk.delta.get("tool_calls")):
                rec.ttft_ms = rec.timing.elapsed_ms()  # first token, not the role-only opening chunk
            if chunk.delta or chunk.finish_reason:
                yield render_chunk(chunk, request_id=rid, model=body.model, created=created)
            try:
                chunk = await dispatch.next_chunk(opened, idle_timeout_s)
            except StopAsyncIteration:
                chunk = None
    except SwitchboardError as exc:
        # Headers are gone: the error travels as an SSE event, which the OpenAI SDKs raise as APIError.
        rec.finish(RequestStatus.ERROR, exc.status_code, rec.usage, served_model=rec.served_model, error=exc)
        yield render_sse_error(error_body(exc))
        yield SSE_DONE
        return
    rec.finish(RequestStatus.OK, 200, rec.usage, served_model=rec.served_model)
    if include_usage:
        yield render_usage_chunk(rec.usage, request_id=rid, model=body.model, created=created)
    yield SSE_DONE
