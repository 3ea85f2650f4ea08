"""The engine's OpenAI-compatible HTTP server: /v1/chat/completions, /v1/models, /health, /metrics.

This is the HTTP edge: it validates OpenAI wire bodies (pydantic), applies the chat template, and renders
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.local.generate import (
    GenerationDone,
    GenerationFailed,
    GenerationHandle,
    GenerationWorker,
    SamplingParams,
    TextDelta,
)
from backends.local.loader import LoadedModel, load_model

log = logging.getLogger(__name__)

DEFAULT_SERVED_NAMES = ("smollm2", "SmolLM2-135M-Instruct")
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DISCONNECT_POLL_S = 0.25


class ApiError(Exception):
    """An error rendered as an OpenAI error envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        openai_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.openai_type = openai_type
        self.code = code
        self.param = param


class ChatCompletionBody(BaseModel):
    """The subset of the OpenAI chat request this engine reads; unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # torch.manual_seed's range
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None


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


def _error_response(error: ApiError) -> Response:
    body = {
        "error": {
            "message": error.message,
            "type": error.openai_type,
            "param": error.param,
            "code": error.code,
        }
    }
    return Response(orjson.dumps(body), status_code=error.status_code, media_type="application/json")


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


def _message_text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    400,
                    "only text content parts are supported by this engine",
                    param=f"messages.{index}.content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(
        400, "message content must be a string or a list of text parts", param=f"messages.{index}.content"
    )


def encode_chat(tokenizer: Any, messages: Iterable[Mapping[str, Any]]) -> list[int]:
    """Validate OpenAI messages and apply the model's chat template; returns prompt token ids."""
    normalized = []
    for index, message in enumerate(messages):
        role = _ROLE_ALIASES.get(str(message.get("role")))
        if role is None:
            raise ApiError(
                400,
                f"message role `{message.get('role')}` is not supported by this engine; "
                f"use one of: {', '.join(_ROLE_ALIASES)}",
                param=f"messages.{index}.role",
            )
        normalized.append({"role": role, "content": _message_text(index, message.get("content"))})
    encoded = tokenizer.apply_chat_template(
        normalized, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _reject_unsupported(body: ChatCompletionBody) -> None:
    if body.n != 1:
        raise ApiError(
            400, f"n={body.n} is unsupported: this engine returns exactly one choice (use n=1)", param="n"
        )
    if body.tools:
        raise ApiError(400, "tools are not supported by this engine", param="tools")
    if body.tool_choice not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this engine", param="tool_choice")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format is not supported by this engine", param="response_format")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported by this engine", param="logprobs")


def _sampling_params(body: ChatCompletionBody, prompt_tokens: int, context_tokens: int) -> SamplingParams:
    room = context_tokens - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"prompt is {prompt_tokens} tokens; this model's context is {context_tokens} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > room:
        raise ApiError(
            400,
            f"max_tokens={requested} plus the {prompt_tokens}-token prompt exceeds the "
            f"{context_tokens}-token context; lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop must be at most 4 non-empty strings", param="stop")
    return SamplingParams(
        max_tokens=requested or room,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
    )


async def _parse_body(request: Request) -> ChatCompletionBody:
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc.msg}") from exc
    try:
        return ChatCompletionBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from exc


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
    events = handle.events()
    parts: list[str] = []
    while True:
        next_event = asyncio.ensure_future(anext(events))
        while not next_event.done():
            await asyncio.wait({next_event}, timeout=_DISCONNECT_POLL_S)
            if not next_event.done() and await request.is_disconnected():
                handle.cancel()
        event = next_event.result()
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, GenerationDone):
            return "".join(parts), event
        else:
            raise _failure(event)


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
            error = _failure(event)
            yield (
                b"data: "
                + orjson.dumps(
                    {
                        "error": {
                            "message": error.message,
                            "type": error.openai_type,
                            "param": None,
                            "code": error.code,
                        }
                    }
                )
                + b"\n\n"
            )
    yield b"data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    try:
        body = await _parse_body(request)
        if body.model not in state.served_names:
            raise ApiError(
                404,
                f"model `{body.model}` is not served here; served: {', '.join(state.served_names)}",
                param="model",
                code="model_not_found",
            )
        _reject_unsupported(body)
        prompt_ids = encode_chat(state.loaded.tokenizer, body.messages)
        params = _sampling_params(body, len(prompt_ids), state.context_tokens)
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


def create_engine_app(loaded: LoadedModel, *, served_names: Iterable[str] = DEFAULT_SERVED_NAMES) -> FastAPI:
    """Build the engine app; the generation thread starts with the app's lifespan and stops with it."""
    engine_metrics = _build_metrics()
    worker = GenerationWorker(loaded.model, loaded.tokenizer, on_finish=partial(_record, engine_metrics))
    _add_worker_gauges(engine_metrics.registry, worker)
    state = EngineState(
        loaded=loaded,
        worker=worker,
        metrics=engine_metrics,
        served_names=tuple(served_names),
        context_tokens=int(loaded.model.config.max_position_embeddings),
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
) -> None:
    """Load the model, then serve it over HTTP until interrupted (blocking).

    Served names default to "smollm2", "SmolLM2-135M-Instruct" and the loaded model's own name.
    """
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(model_spec)
    names = served_names if served_names is not None else (*DEFAULT_SERVED_NAMES, loaded.name)
    app = create_engine_app(loaded, served_names=dict.fromkeys(names))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    ready = (
        f"engine ready on http://{host}:{port} (model {loaded.name}, load {loaded.load_s:.1f} s, "
        f"RSS {loaded.rss_mb:.0f} MB)"
    )
    asyncio.run(_serve_until_stopped(server, ready))
