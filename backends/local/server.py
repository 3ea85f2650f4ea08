"""The engine's OpenAI-compatible HTTP server: /v1/chat/completions, /v1/models, /health, /metrics.

This is the HTTP edge: `wire` parses and checks bodies and applies the chat template; this module renders
results and errors (`{"error": {message, type, param, code}}`; bad input is 4xx, never 500). Generation lives
behind `GenerationWorker`, which takes token ids, so the generation insides can change without touching this
file. All state (worker, metrics registry) hangs off `app.state`; the worker thread starts in the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.local.generate import (
    GenerationDone,
    GenerationFailed,
    GenerationHandle,
    GenerationWorker,
    TextDelta,
)
from backends.local.loader import LoadedModel, load_model
from backends.local.wire import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    ChatCompletionBody,
    encode_chat,
    error_envelope,
    parse_body,
    reject_unsupported,
    sampling_params,
)

log = logging.getLogger(__name__)

DEFAULT_SERVED_NAMES = ("smollm2", "SmolLM2-135M-Instruct")


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    registry: CollectorRegistry
    requests: Counter
    prompt_tokens: Counter
    completion_tokens: Counter


@dataclass(frozen=True, slots=True)
class EngineState:
    loaded: LoadedModel
    worker: GenerationWorker
    metrics: EngineMetrics
    served_names: tuple[str, ...]
    context_tokens: int
    default_max_tokens: int


def _error_response(error: ApiError) -> Response:
    body = orjson.dumps(error_envelope(error))
    return Response(body, status_code=error.status_code, media_type="application/json")


def _json(body: Mapping[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _build_metrics() -> EngineMetrics:
    registry = CollectorRegistry()
    return EngineMetrics(
        registry=registry,
        requests=Counter(
            "switchboard_engine_requests", "Chat requests by outcome", ["outcome"], registry=registry
        ),
        prompt_tokens=Counter("switchboard_engine_prompt_tokens", "Prompt tokens", registry=registry),
        completion_tokens=Counter(
            "switchboard_engine_completion_tokens", "Completion tokens", registry=registry
        ),
    )


def _add_worker_gauges(registry: CollectorRegistry, worker: GenerationWorker) -> None:
    depth = Gauge("switchboard_engine_queue_depth", "Requests waiting for the worker", registry=registry)
    depth.set_function(lambda: worker.queue_depth)
    running = Gauge("switchboard_engine_running_requests", "Requests being generated", registry=registry)
    running.set_function(lambda: worker.running_requests)


class _CancellingStream(StreamingResponse):
    """Calls `on_close` however the response ends, so a client disconnect aborts generation."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _record(metrics: EngineMetrics, outcome: GenerationDone | GenerationFailed) -> None:
    """Runs on the worker thread (prometheus counters are thread-safe)."""
    if isinstance(outcome, GenerationFailed):
        metrics.requests.labels(outcome="error").inc()
        return
    metrics.requests.labels(outcome="cancelled" if outcome.cancelled else "ok").inc()
    metrics.prompt_tokens.inc(outcome.prompt_tokens)
    metrics.completion_tokens.inc(outcome.completion_tokens)


def _usage(done: GenerationDone) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _failure(failed: GenerationFailed) -> ApiError:
    return ApiError(500, failed.message, openai_type="api_error", code="engine_error")


async def _collect(
    state: EngineState, handle: GenerationHandle, request: Request
) -> tuple[str, GenerationDone]:
    """Gather a whole answer, aborting generation if the client goes away meanwhile."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    parts: list[str] = []
    try:
        async for event in handle.events():
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, GenerationDone):
                return "".join(parts), event
            else:
                raise _failure(event)
    finally:
        watcher.cancel()
    raise _failure(GenerationFailed("generation ended without a result"))


async def _cancel_on_disconnect(request: Request, handle: GenerationHandle) -> None:
    """Waits on the ASGI channel (the body is already read, so only `http.disconnect` can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _sse(
    state: EngineState, handle: GenerationHandle, body: ChatCompletionBody
) -> AsyncIterator[bytes]:
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    base: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.model,
    }
    if include_usage:
        base["usage"] = None

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for event in handle.events():
        if isinstance(event, TextDelta):
            yield frame([{"index": 0, "delta": {"content": event.text}, "finish_reason": None}])
        elif isinstance(event, GenerationDone):
            yield frame([{"index": 0, "delta": {}, "finish_reason": str(event.finish_reason)}])
            if include_usage:
                yield frame([], usage=_usage(event))
        else:
            yield b"data: " + orjson.dumps(error_envelope(_failure(event))) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    try:
        body = parse_body(await request.body())
        if body.model not in state.served_names:
            raise ApiError(
                404,
                f"model `{body.model}` is not served here; served: {', '.join(state.served_names)}",
                param="model",
                code="model_not_found",
            )
        reject_unsupported(body)
        prompt_ids = encode_chat(state.loaded.tokenizer, body.messages)
        params = sampling_params(
            body, len(prompt_ids), state.context_tokens, default_max_tokens=state.default_max_tokens
        )
    except ApiError:
        state.metrics.requests.labels(outcome="rejected").inc()
        raise
    handle = state.worker.submit(prompt_ids, params)
    if body.stream:
        return _CancellingStream(_sse(state, handle, body), on_close=handle.cancel)
    try:
        text, done = await _collect(state, handle, request)
    finally:
        handle.cancel()
    return _json(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": str(done.finish_reason),
                }
            ],
            "usage": _usage(done),
        }
    )


async def list_models(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    created = int(time.time())
    models = [
        {"id": name, "object": "model", "created": created, "owned_by": "switchboard"}
        for name in state.served_names
    ]
    return _json({"object": "list", "data": models})


async def health(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    if not state.worker.alive:
        return _error_response(
            ApiError(
                503, "generation worker is not running", openai_type="api_error", code="engine_unavailable"
            )
        )
    return _json({"status": "ok", "model": state.loaded.name})


async def metrics(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        return _error_response(ApiError(400, f"invalid request: {exc}"))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error serving %s", request.url.path, exc_info=exc)
        return _error_response(
            ApiError(500, "internal engine error", openai_type="api_error", code="internal_error")
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def create_engine_app(
    loaded: LoadedModel,
    *,
    served_names: Iterable[str] = DEFAULT_SERVED_NAMES,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """Build the engine app; the generation thread starts with the app's lifespan and stops with it.

    `default_max_tokens` caps a request that sends no max_tokens (never beyond the room left in the context).
    """
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be at least 1, got {default_max_tokens}")
    engine_metrics = _build_metrics()
    worker = GenerationWorker(loaded.model, loaded.tokenizer, on_finish=partial(_record, engine_metrics))
    _add_worker_gauges(engine_metrics.registry, worker)
    state = EngineState(
        loaded=loaded,
        worker=worker,
        metrics=engine_metrics,
        served_names=tuple(served_names),
        context_tokens=int(loaded.model.config.max_position_embeddings),
        default_max_tokens=default_max_tokens,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="Switchboard engine", lifespan=lifespan)
    app.state.engine = state
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    _install_error_handlers(app)
    return app


async def _serve_until_stopped(server: Any, ready_message: str) -> None:
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        log.info("%s", ready_message)
    await serving


def serve_engine(
    model_spec: str,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    served_names: Iterable[str] | None = None,
    max_tokens_default: int = DEFAULT_MAX_TOKENS,
) -> None:
    """Load the model, then serve it over HTTP until interrupted (blocking).

    Served names default to "smollm2", "SmolLM2-135M-Instruct" and the loaded model's own name. A request
    without max_tokens generates at most `max_tokens_default` tokens (default 1024), so a CPU engine never
    runs to the model's full context (8192 for SmolLM2) by accident.
    """
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(model_spec)
    names = served_names if served_names is not None else (*DEFAULT_SERVED_NAMES, loaded.name)
    app = create_engine_app(loaded, served_names=dict.fromkeys(names), default_max_tokens=max_tokens_default)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    ready = (
        f"engine ready on http://{host}:{port} (model {loaded.name}, load {loaded.load_s:.1f} s, "
        f"RSS {loaded.rss_mb:.0f} MB)"
    )
    asyncio.run(_serve_until_stopped(server, ready))
