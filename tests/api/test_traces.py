"""OpenTelemetry traces ([telemetry]) of requests through a live gateway, driven by the official `openai` SDK.

The gateway exports over OTLP/HTTP to a collector stub (tests/support/otlp_collector.py); the tests also add
an in-memory exporter to its own TracerProvider. Checked: one request span per request with the GenAI
semantic conventions and Switchboard's attributes, equal to the ledger row; one attempt span per attempt (a
fallback shows two, the failed one with error status); a stream's span ends when its row is written; a
failed request's span has error status; no prompt or answer text unless capture_content is on.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config import parse_config
from gateway.http.app import create_app
from gateway.services import Services
from gateway.store.db import make_engine
from gateway.telemetry.spans import OtelRequestTracer
from tests.support.api_gateway import FAKE_UPSTREAM_KEY, Gateway
from tests.support.fake_provider import FakeProvider
from tests.support.live import LiveServer
from tests.support.otlp_collector import OtlpCollector

SECRET = "violet-heron-" + uuid.uuid4().hex  # prompt text that must never reach a span by default


def _config(fake_root: str, tmp: str, collector: str, capture: bool) -> Any:
    fake_v1 = fake_root + "/v1"
    price = {"input_usd_per_mtok": "2", "output_usd_per_mtok": "8"}
    return parse_config(
        {
            "database": {
                "url": f"sqlite:///{tmp}/sb.db",
                "spill_path": f"{tmp}/spill",
                "flush_interval_s": 0.02,
            },
            "backends": {
                "tr_a": {"kind": "openai", "base_url": fake_v1},
                "tr_b": {"kind": "openai", "base_url": fake_v1},
                "tr_cloud": {
                    "kind": "cloud",
                    "provider": "openai",
                    "api_base": fake_v1,
                    "api_key_env": "SB_TEST_FAKE_KEY",
                    "timeout_s": 10,
                },
            },
            "models": {
                "tr-one": {"backend": "tr_a", "upstream_model": "tr-one-up", **price},
                "tr-cloud": {"backend": "tr_cloud", "upstream_model": "tr-cloud-up", **price},
                "tr-fb": {
                    "deployments": [
                        {"backend": "tr_a", "upstream_model": "tr-fb-a", **price},
                        {"backend": "tr_b", "upstream_model": "tr-fb-b", **price},
                    ]
                },
                "tr-dead": {"backend": "tr_a", "upstream_model": "tr-dead-up", **price},
            },
            "teams": {"tracers": {"models": ["*"]}},
            "routing": {"breaker_failures": 1_000_000},
            "telemetry": {
                "enabled": True,
                "endpoint": collector,
                "service_name": "sb-trace-test",
                "capture_content": capture,
                "headers": {"x-tenant": "ops"},
            },
        }
    )


@dataclass
class Traced:
    gw: Gateway
    client: openai.OpenAI
    spans: InMemorySpanExporter
    collector: OtlpCollector
    tracer: OtelRequestTracer

    def request_spans(self, request_id: str) -> list[ReadableSpan]:
        return [
            s
            for s in self.spans.get_finished_spans()
            if _attrs(s).get("switchboard.request_id") == request_id
        ]

    def children(self, span: ReadableSpan) -> list[ReadableSpan]:
        assert span.context is not None
        found = [
            s
            for s in self.spans.get_finished_spans()
            if s.parent is not None and s.parent.span_id == span.context.span_id
        ]
        return sorted(found, key=lambda s: s.start_time or 0)


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _serve(fake: FakeProvider, tmp: str, capture: bool) -> Iterator[Traced]:
    os.environ["SB_TEST_FAKE_KEY"] = FAKE_UPSTREAM_KEY
    with OtlpCollector() as collector:
        config = _config(fake.base_url, tmp, collector.endpoint, capture)
        app = create_app(config)
        with LiveServer(app) as server:
            services: Services = app.state.services
            tracer = services.tracer
            assert isinstance(tracer, OtelRequestTracer)
            memory = InMemorySpanExporter()
            tracer.provider.add_span_processor(SimpleSpanProcessor(memory))
            engine = make_engine(config.database.url)
            try:
                gw = Gateway(server.base_url, config, engine, fake)
                client = openai.OpenAI(base_url=gw.v1, api_key=gw.key("tracers"), max_retries=0, timeout=30)
                yield Traced(gw, client, memory, collector, tracer)
            finally:
                engine.dispose()


@pytest.fixture(scope="module")
def traced(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    yield from _serve(fake, str(tmp_path_factory.mktemp("traces")), capture=False)


@pytest.fixture(scope="module")
def captured(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    yield from _serve(fake, str(tmp_path_factory.mktemp("traces-content")), capture=True)


def _chat(t: Traced, model: str, **kwargs: Any) -> tuple[str, str]:
    """(request id, answer text) of one chat completion carrying SECRET in its prompt."""
    raw = t.client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"tell me about {SECRET}"}], **kwargs
    )
    return raw.headers["x-request-id"], raw.parse().choices[0].message.content or ""


def _no_text(spans: list[ReadableSpan], *texts: str) -> None:
    for span in spans:
        values = [str(v) for v in _attrs(span).values()]
        values += [str(v) for e in span.events for v in (e.attributes or {}).values()] + [span.name]
        for text in texts:
            assert not any(text in v for v in values), f"{text!r} leaked into span {span.name}"


def test_one_request_span_with_the_genai_attributes(traced: Traced) -> None:
    request_id, answer = _chat(traced, "tr-one", temperature=0.25, max_tokens=7)
    row = traced.gw.usage_row(request_id)
    [span] = traced.request_spans(request_id)
    attrs = _attrs(span)
    assert span.name == "chat tr-one" and span.kind is SpanKind.SERVER
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "tr-one"
    assert attrs["gen_ai.response.model"] == row["served_model"]
    assert attrs["gen_ai.usage.input_tokens"] == row["prompt_tokens"] > 0
    assert attrs["gen_ai.usage.output_tokens"] == row["completion_tokens"] > 0
    assert attrs["gen_ai.provider.name"] == attrs["gen_ai.system"] == "openai_compatible"
    assert attrs["gen_ai.request.temperature"] == 0.25 and attrs["gen_ai.request.max_tokens"] == 7
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)  # the fake says 8 tokens
    assert attrs["switchboard.team"] == "tracers"
    assert attrs["switchboard.deployment"] == "tr-one/tr_a" and attrs["switchboard.backend"] == "tr_a"
    assert attrs["switchboard.privacy_class"] == row["privacy_class"]
    assert attrs["switchboard.route_reason"] == row["route_reason"]
    assert (
        attrs["switchboard.cost_usd"] == pytest.approx(row["cost_micro_usd"] / 1e6)
        and row["cost_micro_usd"] > 0
    )
    assert attrs["switchboard.cache"] == "skip"  # [cache] is off
    assert attrs["switchboard.endpoint"] == "chat.completions" and attrs["http.response.status_code"] == 200
    assert span.status.status_code is StatusCode.UNSET
    [attempt] = traced.children(span)
    assert attempt.kind is SpanKind.CLIENT and attempt.name == "chat tr-one-up"
    assert _attrs(attempt)["switchboard.outcome"] == "ok" and _attrs(attempt)["switchboard.attempt"] == 1
    assert span.start_time is not None and attempt.start_time is not None and span.end_time is not None
    assert span.start_time <= attempt.start_time <= (attempt.end_time or 0) <= span.end_time
    assert span.resource.attributes["service.name"] == "sb-trace-test"
    _no_text([span, attempt], SECRET, answer)


def test_cloud_provider_name_is_the_configured_provider(traced: Traced) -> None:
    request_id, _ = _chat(traced, "tr-cloud")
    [span] = traced.request_spans(request_id)
    assert _attrs(span)["gen_ai.provider.name"] == "openai"
    assert _attrs(traced.children(span)[0])["switchboard.backend_kind"] == "cloud"


def test_a_fallback_shows_one_span_per_attempt(traced: Traced, fake: FakeProvider) -> None:
    fake.configure("tr-fb-a", fail_status=500)
    try:
        request_id, _ = _chat(traced, "tr-fb")
    finally:
        fake.forget("tr-fb-a")
    row = traced.gw.usage_row(request_id)
    [span] = traced.request_spans(request_id)
    assert row["attempts"] == 2 and _attrs(span)["switchboard.attempts"] == 2
    assert _attrs(span)["switchboard.backend"] == "tr_b" and span.status.status_code is StatusCode.UNSET
    first, second = traced.children(span)
    assert _attrs(first)["switchboard.deployment"] == "tr-fb/tr_a"
    assert first.status.status_code is StatusCode.ERROR
    assert _attrs(first)["error.type"] == _attrs(first)["switchboard.outcome"] != "ok"
    assert _attrs(second)["switchboard.deployment"] == "tr-fb/tr_b"
    assert _attrs(second)["switchboard.outcome"] == "ok" and second.status.status_code is StatusCode.UNSET
    assert (first.end_time or 0) <= (second.start_time or 0)
    _no_text([span, first, second], SECRET)


def test_a_failed_request_has_error_status(traced: Traced, fake: FakeProvider) -> None:
    fake.configure("tr-dead-up", fail_status=500)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            _chat(traced, "tr-dead")
    finally:
        fake.forget("tr-dead-up")
    request_id = caught.value.response.headers["x-request-id"]
    row = traced.gw.usage_row(request_id)
    [span] = traced.request_spans(request_id)
    assert span.status.status_code is StatusCode.ERROR
    assert _attrs(span)["error.type"] == row["error_type"] and row["error_type"]
    assert _attrs(span)["http.response.status_code"] == row["http_status"] == caught.value.status_code
    attempts = traced.children(span)
    assert len(attempts) == row["attempts"] >= 1
    assert all(a.status.status_code is StatusCode.ERROR for a in attempts)


def test_a_stream_span_ends_when_its_row_is_written(traced: Traced, fake: FakeProvider) -> None:
    fake.configure("tr-one-up", tokens_per_s=200, n_tokens=10)
    try:
        with traced.client.chat.completions.with_streaming_response.create(
            model="tr-one",
            messages=[{"role": "user", "content": f"stream about {SECRET}"}],
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            request_id = response.headers["x-request-id"]
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    finally:
        fake.forget("tr-one-up")
    row = traced.gw.usage_row(request_id)
    [span] = traced.request_spans(request_id)
    attrs = _attrs(span)
    assert (
        attrs["switchboard.stream"] is True
        and attrs["gen_ai.usage.output_tokens"] == row["completion_tokens"]
    )
    assert attrs["switchboard.ttft_ms"] == pytest.approx(row["ttft_ms"]) and row["ttft_ms"] > 0
    duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    assert duration_ms >= 40  # 10 tokens at 200/s: the span covers the whole stream, not its first token
    assert duration_ms == pytest.approx(row["latency_ms"], abs=5)
    [attempt] = traced.children(span)
    assert attempt.end_time == span.end_time  # the served stream's attempt lasts until the row
    _no_text([span, attempt], SECRET, text)


def test_export_reaches_the_otlp_collector(traced: Traced) -> None:
    request_id, _ = _chat(traced, "tr-one")
    traced.tracer.provider.force_flush()
    [span] = traced.collector.wait_for("switchboard.request_id", request_id)
    assert span["attributes"]["gen_ai.operation.name"] == "chat"
    assert span["resource"]["service.name"] == "sb-trace-test"
    children = [s for s in traced.collector.spans if s["parent_span_id"] == span["span_id"]]
    assert [c["attributes"]["switchboard.backend"] for c in children] == ["tr_a"]
    assert traced.collector.posts[-1]["x-tenant"] == "ops"
    assert traced.collector.posts[-1]["content-type"] == "application/x-protobuf"


def test_a_traceparent_header_makes_the_request_span_its_child(traced: Traced) -> None:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    raw = traced.client.chat.completions.with_raw_response.create(
        model="tr-one",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    [span] = traced.request_spans(raw.headers["x-request-id"])
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == trace_id and f"{span.parent.span_id:016x}" == parent_id


def test_capture_content_puts_the_text_in(captured: Traced) -> None:
    request_id, answer = _chat(captured, "tr-one")
    [span] = captured.request_spans(request_id)
    attrs = _attrs(span)
    assert SECRET in attrs["gen_ai.input.messages"] and '"role":"user"' in attrs["gen_ai.input.messages"]
    assert answer and answer in attrs["gen_ai.output.messages"]


def test_capture_content_keeps_a_streamed_answer(captured: Traced) -> None:
    with captured.client.chat.completions.with_streaming_response.create(
        model="tr-one", messages=[{"role": "user", "content": f"stream {SECRET}"}], stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    captured.gw.usage_row(request_id)
    [span] = captured.request_spans(request_id)
    assert text and text in _attrs(span)["gen_ai.output.messages"]
    assert SECRET in _attrs(span)["gen_ai.input.messages"]
