"""A finished request as spans: one request span with the GenAI semantic conventions' attributes and
Switchboard's, and one child span per attempt (a fallback shows several).

Spans are made when the request's ledger row is written, with the start and end times the request kept, so
nothing of OpenTelemetry runs on the request's way and a stream's span ends when its row is written. Prompt
and answer text are put in only when `capture_content` is on. Imports OpenTelemetry: only `setup` loads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from backends.base import BackendKind, ChatRequest, ChatResult, EmbeddingRequest
from gateway.records import RequestStatus
from gateway.telemetry import content
from gateway.telemetry.base import AttemptMark, FinishedRequest
from routing.decision import Deployment

Attributes = dict[str, Any]
# What a self-hosted backend's provider is called (a cloud backend's is its config `provider`).
_SELF_HOSTED = {
    BackendKind.OPENAI: "openai_compatible",
    BackendKind.LOCAL: "switchboard",
    BackendKind.EDGE: "edge",
}


def operation(endpoint: str, call: ChatRequest | EmbeddingRequest) -> str:
    """`gen_ai.operation.name`: chat, text_completion or embeddings."""
    if isinstance(call, EmbeddingRequest):
        return "embeddings"
    return "text_completion" if endpoint == "completions" else "chat"


class OtelRequestTracer:
    """Owns its `TracerProvider` (never the process-global one): tests add processors to `provider`."""

    def __init__(
        self, provider: TracerProvider, cloud_providers: Mapping[str, str], *, capture_content: bool
    ) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("switchboard")
        self._cloud_providers = cloud_providers  # cloud backend name -> its litellm provider
        self._capture_content = capture_content
        self._propagator = TraceContextTextMapPropagator()

    @property
    def capture_content(self) -> bool:
        return self._capture_content

    def provider_name(self, dep: Deployment) -> str:
        if dep.backend_kind is BackendKind.CLOUD:
            return self._cloud_providers.get(dep.backend, dep.backend)
        return _SELF_HOSTED.get(dep.backend_kind, str(dep.backend_kind))

    def request_finished(self, request: FinishedRequest) -> None:
        offset_ns = time.time_ns() - int(request.end_s * 1e9)  # Clock seconds -> Unix nanoseconds

        def wall_ns(clock_s: float) -> int:
            return int(clock_s * 1e9) + offset_ns

        row = request.row
        parent = (
            self._propagator.extract({"traceparent": request.traceparent}) if request.traceparent else None
        )
        op = operation(row.endpoint, request.call)
        span = self._tracer.start_span(
            f"{op} {row.requested_model}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=wall_ns(request.start_s),
        )
        if not span.is_recording():  # not sampled
            return
        span.set_attributes(self._request_attributes(request, op))
        context = trace.set_span_in_context(span)
        for number, mark in enumerate(request.attempts, 1):
            ended_s = request.end_s if mark.error is None and row.stream else mark.ended_s
            child = self._tracer.start_span(
                f"{op} {mark.deployment.upstream_model}",
                context=context,
                kind=SpanKind.CLIENT,
                start_time=wall_ns(mark.started_s),
                attributes=self._attempt_attributes(mark, op, number),
            )
            if mark.error is not None:
                child.set_status(Status(StatusCode.ERROR, mark.error))
            child.end(end_time=wall_ns(ended_s))
        if row.status is RequestStatus.ERROR:
            span.set_status(Status(StatusCode.ERROR, row.error_type or "error"))
        span.end(end_time=wall_ns(request.end_s))

    def _request_attributes(self, request: FinishedRequest, op: str) -> Attributes:
        row, call, served = request.row, request.call, request.served
        attrs: Attributes = {
            "gen_ai.operation.name": op,
            "gen_ai.request.model": row.requested_model,
            "gen_ai.usage.input_tokens": row.prompt_tokens,
            "gen_ai.usage.output_tokens": row.completion_tokens,
            "switchboard.request_id": row.request_id,
            "switchboard.endpoint": row.endpoint,
            "switchboard.team": row.team,
            "switchboard.stream": row.stream,
            "switchboard.status": str(row.status),
            "switchboard.attempts": row.attempts,
            "switchboard.cost_usd": row.cost_micro_usd / 1e6,
            "switchboard.latency_ms": row.latency_ms,
            "http.response.status_code": row.http_status,
        }
        optional = {
            "gen_ai.response.model": row.served_model,
            "switchboard.key_id": row.key_id,
            "switchboard.backend": row.backend,
            "switchboard.privacy_class": row.privacy_class,
            "switchboard.route_reason": row.route_reason,
            "switchboard.ttft_ms": row.ttft_ms,
            "switchboard.cache": "hit" if row.cache_hit else request.cache,
            "switchboard.batch_id": row.batch_id,
            "error.type": row.error_type,
        }
        attrs.update((k, v) for k, v in optional.items() if v is not None)
        if row.cache_hit:
            attrs["switchboard.cost_saved_usd"] = row.cost_saved_micro_usd / 1e6
        if served is not None:
            provider = self.provider_name(served)
            attrs["gen_ai.provider.name"] = attrs["gen_ai.system"] = provider
            attrs["switchboard.deployment"] = f"{served.public_model}/{served.backend}"
        attrs.update(_request_params(call))
        if isinstance(request.output, ChatResult):
            attrs["gen_ai.response.finish_reasons"] = (request.output.finish_reason,)
        if self._capture_content and isinstance(call, ChatRequest):
            attrs["gen_ai.input.messages"] = content.input_messages(call)
            answer = content.output_messages(request.output) if request.output is not None else None
            if answer is not None:
                attrs["gen_ai.output.messages"] = answer
        return attrs

    def _attempt_attributes(self, mark: AttemptMark, op: str, number: int) -> Attributes:
        dep = mark.deployment
        provider = self.provider_name(dep)
        attrs: Attributes = {
            "gen_ai.operation.name": op,
            "gen_ai.request.model": dep.upstream_model,
            "gen_ai.provider.name": provider,
            "gen_ai.system": provider,
            "switchboard.deployment": f"{dep.public_model}/{dep.backend}",
            "switchboard.backend": dep.backend,
            "switchboard.backend_kind": str(dep.backend_kind),
            "switchboard.attempt": number,
            "switchboard.outcome": "ok" if mark.error is None else mark.error,
        }
        if mark.error is not None:
            attrs["error.type"] = mark.error
        return attrs

    async def aclose(self) -> None:
        await asyncio.to_thread(self.provider.shutdown)  # flushes the batch processor: blocking I/O


def _request_params(call: ChatRequest | EmbeddingRequest) -> Attributes:
    if isinstance(call, EmbeddingRequest):
        return {} if call.dimensions is None else {"gen_ai.embeddings.dimension.count": call.dimensions}
    params = {
        "gen_ai.request.max_tokens": call.max_tokens,
        "gen_ai.request.temperature": call.temperature,
        "gen_ai.request.top_p": call.top_p,
        "gen_ai.request.seed": call.seed,
        "gen_ai.request.stop_sequences": call.stop or None,
    }
    return {k: v for k, v in params.items() if v is not None}
