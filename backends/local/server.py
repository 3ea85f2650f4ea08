"""The engine's OpenAI-compatible HTTP server: chat and text completions, embeddings (when an embedding model
is loaded: backends/local/embedding_api.py), vLLM's /tokenize (tokenize_api.py), /v1/models, /health and
/metrics.

This is the HTTP edge: `wire` parses and checks bodies and applies the chat template; this module renders
results and errors (`{"error": {message, type, param, code}}`; bad input is 4xx, never 500). Generation is
the continuous-batching `Engine`, which takes and returns token ids: `serving` turns them into text through a
`StopStringDecoder`, and a stop string or a client disconnect aborts the request (freeing its KV blocks).
All state (engine, tokenizer, metrics) hangs off `app.state`; the engine thread starts in the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.local.build import EngineOptions, one_compute_thread, stage
from backends.local.embedding import Embedder
from backends.local.embedding_api import EmbeddingService, embeddings
from backends.local.engine.engine import Failed
from backends.local.loader import LoadedModel, load_engine_model
from backends.local.serving import (
    Done,
    EngineState,
    Generation,
    TextDelta,
    build_engine_state,
    check_model,
    failure,
    queued,
    queueing_of,
    start,
    start_chat,
)
from backends.local.tokenize_api import tokenize
from backends.local.wire import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    ApiError,
    ChatCompletionBody,
    CompletionBody,
    encode_prompt,
    error_envelope,
    parse_json,
    reject_unsupported_completion,
    sampling_params,
)

log = logging.getLogger(__name__)

DEFAULT_SERVED_NAMES = ("smollm2", "SmolLM2-135M-Instruct")


def _error_response(error: ApiError) -> Response:
    body = orjson.dumps(error_envelope(error))
    return Response(body, status_code=error.status_code, media_type="application/json")


def _json(body: Mapping[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


class _ClosingStream(StreamingResponse):
    """Calls `on_close` however the response ends, so a client disconnect aborts generation."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _collect(gen: Generation, request: Request) -> tuple[str, Done]:
    """Gather a whole answer, aborting generation if the client goes away meanwhile."""
    watcher = asyncio.create_task(_close_on_disconnect(request, gen))
    parts: list[str] = []
    try:
        async for item in gen.texts():
            if isinstance(item, TextDelta):
                parts.append(item.text)
            else:
                return "".join(parts), item
    finally:
        watcher.cancel()
        gen.close()
    raise failure(Failed("generation ended without a result"))


async def _close_on_disconnect(request: Request, gen: Generation) -> None:
    """Waits on the ASGI channel (the body is already read, so only `http.disconnect` can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.close()
            return


def _sse(data: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    gen: Generation,
    base: dict[str, Any],
    include_usage: bool,
    choice: Callable[[str, str | None], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """SSE frames: `choice(text, finish_reason)` per delta, a finish frame, optional usage, `[DONE]`."""
    if include_usage:
        base = {**base, "usage": None}
    try:
        async for item in gen.texts():
            if isinstance(item, TextDelta):
                yield _sse({**base, "choices": [choice(item.text, None)]})
            else:
                yield _sse({**base, "choices": [choice("", str(item.finish_reason))]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": item.usage()})
    except ApiError as exc:
        yield _sse(error_envelope(exc))
    yield b"data: [DONE]\n\n"


def _base(kind: str, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _chat_chunk(text: str, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": text} if finish is None else {}, "finish_reason": finish}


async def _chat_frames(gen: Generation, base: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    yield _sse({**base, "choices": [first]})
    async for frame in _stream(gen, base, include_usage, _chat_chunk):
        yield frame


async def chat_completions(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    try:
        body = parse_json(await request.body(), ChatCompletionBody)
        gen = start_chat(state, body, queueing_of(request.headers))
    except ApiError:
        state.metrics.requests.labels(outcome="rejected").inc()
        raise
    if body.stream:
        base = _base("chat.completion.chunk", body.model)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return _ClosingStream(_chat_frames(gen, base, include_usage), on_close=gen.close)
    text, done = await _collect(gen, request)
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": str(done.finish_reason)}
    return _json({**_base("chat.completion", body.model), "choices": [choice], "usage": done.usage()})


async def completions(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    try:
        body = parse_json(await request.body(), CompletionBody)
        check_model(state, body.model)
        reject_unsupported_completion(body)
        prompt_ids = encode_prompt(state.loaded.tokenizer, body.prompt, state.vocab_size)
        params = sampling_params(
            body,
            len(prompt_ids),
            state.context_tokens,
            default_max_tokens=min(COMPLETIONS_DEFAULT_MAX_TOKENS, state.default_max_tokens),
            kv_tokens=state.engine.max_kv_tokens(),
            prompt_param="prompt",
            defaults=state.sampling,
        )
        gen = start(state, prompt_ids, queued(params, queueing_of(request.headers)))
    except ApiError:
        state.metrics.requests.labels(outcome="rejected").inc()
        raise

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    base = _base("text_completion", body.model)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return _ClosingStream(_stream(gen, base, include_usage, choice), on_close=gen.close)
    text, done = await _collect(gen, request)
    return _json({**base, "choices": [choice(text, str(done.finish_reason))], "usage": done.usage()})


async def list_models(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    created = int(time.time())
    service: EmbeddingService | None = request.app.state.embeddings
    names = [*state.served_names, *(service.embedder.names if service is not None else ())]
    models = [
        {"id": name, "object": "model", "created": created, "owned_by": "switchboard"} for name in names
    ]
    return _json({"object": "list", "data": models})


async def health(request: Request) -> Response:
    state: EngineState = request.app.state.engine
    if not state.engine.alive:
        return _error_response(
            ApiError(503, "engine loop is not running", openai_type="api_error", code="engine_unavailable")
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
    options: EngineOptions | None = None,
    embedder: Embedder | None = None,
) -> FastAPI:
    """Build the engine app; the engine thread starts with the app's lifespan and stops with it.

    `default_max_tokens` caps a chat request that sends no max_tokens (never beyond the room left in the
    context or the KV cache). Unless `options.release_source`, `loaded.model` stays usable. With an
    `embedder`, `POST /v1/embeddings` serves it under its names.
    """
    state = build_engine_state(
        loaded, options or EngineOptions(), served_names=served_names, default_max_tokens=default_max_tokens
    )
    engine = state.engine
    threads = options.threads if options is not None else None
    service = EmbeddingService(embedder, threads) if embedder is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            if service is not None:
                service.close()
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="Switchboard engine", lifespan=lifespan)
    app.state.engine = state
    app.state.embeddings = service
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])  # at the root, as vLLM serves it
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


class QuietPolls(logging.Filter):
    """Drops the access-log lines of successful /metrics and /health polls (a scraper's every 5-15 s)."""

    QUIET_PATHS = ("/metrics", "/health")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) >= 5 and args[2] in self.QUIET_PATHS:
            return not (isinstance(args[4], int) and args[4] < 400)
        return True


def serve_engine(
    model_spec: str,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    served_names: Iterable[str] | None = None,
    max_tokens_default: int = DEFAULT_MAX_TOKENS,
    options: EngineOptions | None = None,
    embedding_model: str | None = None,
) -> None:
    """Load the model, build the engine, then serve it over HTTP until interrupted (blocking).

    Served names default to "smollm2", "SmolLM2-135M-Instruct" and the loaded model's own name. A chat
    request without max_tokens generates at most `max_tokens_default` tokens (default 1024). With
    `embedding_model` (`minilm`, or a BERT-style HF directory), `POST /v1/embeddings` serves it too.
    """
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options or EngineOptions()
    started_s = time.perf_counter()
    one_compute_thread()  # this thread loads and builds; the engine thread computes with --threads
    with stage(f"load {model_spec}"):
        loaded = load_engine_model(model_spec)
    embedder = None
    if embedding_model is not None:
        with stage(f"load embedding model {embedding_model}"):
            embedder = Embedder.load(embedding_model)
    names = served_names if served_names is not None else (*DEFAULT_SERVED_NAMES, loaded.name)
    app = create_engine_app(
        loaded,
        served_names=dict.fromkeys(names),
        default_max_tokens=max_tokens_default,
        options=replace(options, release_source=True),
        embedder=embedder,
    )
    config = app.state.engine.config
    logging.getLogger("uvicorn.access").addFilter(QuietPolls())
    # ws="none": the engine has no WebSocket route, and uvicorn's default would import a WebSocket stack
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none"))
    ready = (
        f"engine ready on http://{host}:{port} (model {loaded.name}, {config['dtype']} on {options.device}, "
        f"quant {config['quant']}, kernels {config['kernels']}, load {time.perf_counter() - started_s:.1f} s)"
    )
    asyncio.run(_serve_until_stopped(server, ready))
