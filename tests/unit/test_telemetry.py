"""[telemetry] without a live server: config checks, the missing `otel` extra, the sampler, and the GenAI JSON
of captured content (streamed tool calls put back together)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from decimal import Decimal

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from backends.base import BackendKind, ChatRequest, StreamChunk, Usage
from gateway.config import ConfigError, TelemetryConfig, parse_config
from gateway.records import RequestStatus, UsageRecord
from gateway.telemetry import content
from gateway.telemetry.base import AttemptMark, FinishedRequest
from gateway.telemetry.setup import build_tracer
from gateway.telemetry.spans import OtelRequestTracer
from routing.decision import Deployment, Price

DEP = Deployment("m", "gpu", BackendKind.OPENAI, "m-up", Price(Decimal(1), Decimal(2)))


def _finished(request_id: str, *, stream: bool = False) -> FinishedRequest:
    row = UsageRecord(
        request_id=request_id, created_at=dt.datetime.now(dt.UTC), team="t", key_id="k1", requested_model="m",
        backend="gpu", served_model="m-up", prompt_tokens=3, completion_tokens=4, cost_micro_usd=11,
        latency_ms=50.0, ttft_ms=None, status=RequestStatus.OK, http_status=200, error_type=None,
        stream=stream, endpoint="chat.completions", attempts=1,
    )  # fmt: skip
    call = ChatRequest(model="m", messages=({"role": "user", "content": "hi"},), request_id=request_id)
    mark = AttemptMark(DEP, 10.01, 10.02, None)
    return FinishedRequest(row, call, 10.0, 10.05, (mark,), DEP, "miss", None, None, None)


def test_disabled_builds_nothing() -> None:
    assert build_tracer(TelemetryConfig(), {}) is None


def test_a_missing_extra_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError) as info:
        build_tracer(TelemetryConfig(enabled=True), {})
    [problem] = info.value.problems
    assert problem.startswith("telemetry.enabled:") and "switchboard[otel]" in problem
    assert "telemetry.enabled = false" in problem


def test_a_header_from_an_unset_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SB_TEST_OTLP_TOKEN", raising=False)
    cfg = TelemetryConfig(enabled=True, headers_env={"authorization": "SB_TEST_OTLP_TOKEN"})
    with pytest.raises(ConfigError) as info:
        build_tracer(cfg, {})
    assert info.value.problems == [
        "telemetry.headers_env.authorization: environment variable SB_TEST_OTLP_TOKEN is not set (export it)"
    ]


@pytest.mark.parametrize(
    ("telemetry", "expected"),
    [
        ({"endpoint": "127.0.0.1:4318"}, 'telemetry.endpoint: "127.0.0.1:4318" is not an http(s) URL'),
        ({"sample_ratio": 1.5}, "telemetry.sample_ratio: Input should be less than or equal to 1"),
        ({"capture": True}, "telemetry.capture: unknown setting"),
    ],
)
def test_config_mistakes_name_their_setting(telemetry: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"telemetry": telemetry})
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def _tracer(ratio: float, capture: bool = False) -> tuple[OtelRequestTracer, InMemorySpanExporter]:
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return OtelRequestTracer(provider, {}, capture_content=capture), memory


def test_the_sample_ratio_keeps_that_share_of_requests() -> None:
    tracer, memory = _tracer(0.25)
    for i in range(2000):
        tracer.request_finished(_finished(f"r{i}"))
    requests = [s for s in memory.get_finished_spans() if s.kind.name == "SERVER"]
    assert 400 <= len(requests) <= 600  # 500 expected; trace ids are random
    assert len(memory.get_finished_spans()) == 2 * len(requests)  # each with its attempt


def test_a_sampled_parent_is_followed_at_ratio_zero() -> None:
    tracer, memory = _tracer(0.0)
    tracer.request_finished(_finished("unsampled"))
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    tracer.request_finished(dataclasses.replace(_finished("sampled"), traceparent=parent))
    ids = [(s.attributes or {}).get("switchboard.request_id") for s in memory.get_finished_spans()]
    assert ids == [None, "sampled"]  # the attempt span, then the request span


def test_times_are_the_requests_own() -> None:
    tracer, memory = _tracer(1.0)
    tracer.request_finished(_finished("timed"))
    attempt, request = memory.get_finished_spans()
    assert request.end_time is not None and request.start_time is not None
    assert request.end_time - request.start_time == pytest.approx(50e6, abs=1e3)  # 10.0 s -> 10.05 s
    assert attempt.start_time - request.start_time == pytest.approx(10e6, abs=1e3)  # type: ignore[operator]


def test_streamed_tool_calls_are_put_back_together() -> None:
    chunks = (
        StreamChunk({"role": "assistant", "content": "Let me "}),
        StreamChunk({"content": "check."}),
        StreamChunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get", "arguments": ""}}]}),
        StreamChunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        StreamChunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        StreamChunk({}, finish_reason="tool_calls", usage=Usage(1, 2)),
    )
    [message] = orjson.loads(content.output_messages(chunks) or "")
    assert message == {
        "role": "assistant",
        "parts": [
            {"type": "text", "content": "Let me check."},
            {"type": "tool_call", "id": "c1", "name": "get", "arguments": '{"city":"Paris"}'},
        ],
        "finish_reason": "tool_calls",
    }


def test_input_messages_keep_roles_tool_results_and_name_images() -> None:
    call = ChatRequest(
        model="m",
        messages=(
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
        ),
        request_id="r",
    )
    assert orjson.loads(content.input_messages(call)) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "what is"}, {"type": "image_url"}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "22 C"}]},
    ]
