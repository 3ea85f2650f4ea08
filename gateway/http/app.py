"""`create_app(config)`: the FastAPI app, its lifespan, error rendering and the OpenAI-compatible routes.

Nothing happens at import time. The lifespan builds `Services` onto `app.state.services` and closes them in
reverse order. Handlers are thin: parse, authenticate, call one service function, render.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.errors import SwitchboardError
from gateway.config import Config
from gateway.edge.api import edge_router
from gateway.errors import InvalidRequest, NotFound, PayloadTooLarge, error_body
from gateway.http.admin import admin_router
from gateway.http.auth import allowed_models, authenticate
from gateway.http.context import RequestContextMiddleware, timing_of
from gateway.http.usage import usage_router
from gateway.pipeline import run as chat
from gateway.pipeline.plan import Hints
from gateway.services import Services, build_services
from gateway.translate.openai_chat import parse_chat_body

log = logging.getLogger("switchboard")
JSON = "application/json"


def error_response(exc: SwitchboardError) -> Response:
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return Response(error_body(exc), status_code=exc.status_code, media_type=JSON, headers=headers)


class SseResponse(StreamingResponse):
    """Streams `chat.SseStream` and finalizes it however the response ends, even if never iterated."""

    def __init__(self, stream: chat.SseStream) -> None:
        super().__init__(stream.body, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._stream.finalize())


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes (config: server.max_body_bytes)")


def services_of(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def chat_completions(request: Request) -> Response:
    svc = services_of(request)
    timing = timing_of(request.scope)
    received_at = dt.datetime.now(dt.UTC)
    identity = await authenticate(svc, request.headers.get("authorization"), now=received_at)
    try:
        body = parse_chat_body(await read_body(request, svc.config.server.max_body_bytes))
    except SwitchboardError:
        svc.metrics.rejected.labels("invalid_request").inc()
        raise
    hints = Hints.from_headers(request.headers)
    if body.stream:
        stream = await chat.open_stream(svc, identity, body, timing, received_at, hints, request.headers)
        return SseResponse(stream)
    payload = await chat.complete(svc, identity, body, timing, received_at, hints, request.headers)
    return Response(payload, media_type=JSON)


async def list_models(request: Request) -> Response:
    svc = services_of(request)
    identity = await authenticate(svc, request.headers.get("authorization"), now=dt.datetime.now(dt.UTC))
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "switchboard"}
        for name in await allowed_models(svc, identity)
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


async def readyz(request: Request) -> Response:
    svc = services_of(request)
    db_ok = await svc.ledger.ping()
    redis_ok = await svc.redis_ok()
    # Without Redis a fail-closed replica refuses limited requests: not ready. Fail-open, it still serves.
    redis_blocks = redis_ok is False and not svc.config.limits.fail_open
    ready = db_ok and not redis_blocks
    body = {
        "status": "ok" if db_ok and redis_ok is not False else "degraded",
        "database": "ok" if db_ok else "unreachable",
        "redis": "not configured" if redis_ok is None else ("ok" if redis_ok else "unreachable"),
        "ledger": {
            "queued": svc.ledger.queued,
            "written": svc.ledger.written,
            "spilled": svc.ledger.spilled,
            "replayed": svc.ledger.replayed,
            "rejected": svc.ledger.rejected,
            "lost": svc.ledger.lost,
            "db_down": svc.ledger.db_down,
        },
    }
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type=JSON)


async def metrics(request: Request) -> Response:
    return Response(services_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


def _install_error_handlers(app: FastAPI) -> None:
    async def on_switchboard(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SwitchboardError)
        return error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return error_response(InvalidRequest(f"invalid value for `{param}`: {err.get('msg')}", param=param))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}; see /docs"))
        err = SwitchboardError(str(exc.detail))
        err.status_code = exc.status_code
        err.openai_type = "invalid_request_error"
        err.code = "method_not_allowed" if exc.status_code == 405 else "http_error"
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return _unexpected(request)

    app.add_exception_handler(SwitchboardError, on_switchboard)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


CHAT_PATH = "/v1/chat/completions"


def _unexpected(request: Request) -> Response:
    # The one top-level catch: log with the request id, answer with the envelope, never leak details.
    log.exception("unhandled error in request %s", timing_of(request.scope).request_id)
    return error_response(SwitchboardError("internal error; the gateway log has details"))


async def _serve_chat(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    try:
        response = await chat_completions(request)
    except SwitchboardError as exc:
        response = error_response(exc)
    except Exception:  # noqa: BLE001 - top-level handler of the fast lane, as on_unexpected is for FastAPI
        response = _unexpected(request)
    await response(scope, receive, send)


class SwitchboardApp(FastAPI):
    """FastAPI plus a fast lane: `POST /v1/chat/completions` skips FastAPI's per-request machinery.

    That machinery (five middleware layers, routing, dependency solving) cost ~12% of the gateway's CPU at
    2k req/s. The lane keeps the request-context middleware and the same error rendering; every other path,
    and the lifespan, go through FastAPI as usual.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chat_lane = RequestContextMiddleware(_serve_chat)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            scope["app"] = self
            await self._chat_lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(config: Config) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await build_services(config)
        # Everything built so far lives as long as the app: move it out of the collector's sight, so the
        # periodic full collections under load scan only per-request garbage (shorter pauses, lower p99).
        gc.freeze()
        try:
            yield
        finally:
            await app.state.services.aclose()

    app = SwitchboardApp(title="Switchboard", version="0.1.0", lifespan=lifespan)
    app.add_api_route(CHAT_PATH, chat_completions, methods=["POST"])  # OpenAPI docs; served by the lane
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.include_router(admin_router())
    app.include_router(usage_router())
    app.include_router(edge_router())  # /v1/edge/connect (WebSocket) and /admin/edge/...
    _install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    return app
