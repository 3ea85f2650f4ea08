"""Build the request tracer from [telemetry]: a TracerProvider of its own (service name, ratio sampler that
follows a sampled parent), a batch processor and the OTLP/HTTP exporter. Off: None, and no import at all."""

from __future__ import annotations

import os
from collections.abc import Mapping

from gateway.config import ConfigError, TelemetryConfig
from gateway.telemetry.base import RequestTracer

EXTRA_HINT = "pip install 'switchboard[otel]' (the OpenTelemetry SDK and its OTLP/HTTP exporter)"


def build_tracer(config: TelemetryConfig, cloud_providers: Mapping[str, str]) -> RequestTracer | None:
    """`cloud_providers`: cloud backend name -> its provider, for `gen_ai.provider.name`."""
    if not config.enabled:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from gateway.telemetry.spans import OtelRequestTracer
    except ImportError as exc:
        raise ConfigError(
            "telemetry",
            [
                f"telemetry.enabled: traces need the `otel` extra, and {exc.name or 'a part of it'} is not "
                f"installed: {EXTRA_HINT}; or set telemetry.enabled = false"
            ],
        ) from None
    headers = dict(config.headers)
    for header, env_name in config.headers_env.items():
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(
                "environment",
                [f"telemetry.headers_env.{header}: environment variable {env_name} is not set (export it)"],
            )
        headers[header] = value
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=headers, timeout=config.export_timeout_s)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return OtelRequestTracer(provider, cloud_providers, capture_content=config.capture_content)
