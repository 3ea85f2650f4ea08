"""OpenTelemetry traces of requests (the `otel` extra; config: [telemetry]).

`base` holds the values the pipeline hands over and the `RequestTracer` seam, with no OpenTelemetry import;
`spans` turns a finished request into spans, `content` its messages into GenAI JSON, `setup` builds the
tracer from config. Nothing is imported from OpenTelemetry unless telemetry is enabled.
"""
