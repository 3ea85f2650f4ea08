"""`create_app(config)`: the FastAPI app, its lifespan, error rendering and the routes.

Nothing happens at import time. The lifespan builds `Services` onto `app.state.services` and closes them in
reverse order. Endpoints that run the request pipeline are translators (gateway/translate/) served on a fast
lane (gateway/http/endpoints.py); every other path goes through FastAPI as usual.
"""

from __future__ import annotations

import datetime as dt
import gc
import hmac
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.errors import SwitchboardError
from gateway.config import Config
from gateway.console import install_console
from gateway.edge.api import edge_router
from gateway.errors import AdminOnly, InvalidRequest, NotFound, error_body
from gateway.http import anthropic_routes
from gateway.http.admin import admin_router
from gateway.http.auth import authenticate, bearer_token
from gateway.http.batches import batches_router
from gateway.http.context import RequestContextMiddleware, timing_of
from gateway.http.deps import RouterDeps
from gateway.http.endpoints import EndpointDeps, Translator, enveloped_response, serve
from gateway.http.files import files_router
from gateway.http.openapi import (
    SSE_EVENT,
    TAG_OPS,
    TAG_TEAM,
    AnyModelList,
    Health,
    Readiness,
    errors,
    finish,
    model_examples,
    ok,
)
from gateway.http.responses import responses_router
from gateway.http.usage import usage_router
from gateway.services import Services
from gateway.services.build import build_services
from gateway.translate.anthropic_headers import VERSION_HEADER
from gateway.translate.anthropic_messages import AnthropicMessages, CountTokensBody
from gateway.translate.anthropic_render import CountAnswer, ErrorAnswer
from gateway.translate.openai_chat import ChatCompletions
from gateway.translate.openai_completions import Completions
from gateway.translate.openai_embeddings import Embeddings
from gateway.translate.openai_responses import Responses

log = logging.getLogger("switchboard")
JSON = "application/json"


def services_of(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def endpoint_deps(svc: Services) -> EndpointDeps:
    server = svc.config.server
    return EndpointDeps(
        svc.access,
        svc.pipeline,
        svc.metrics,
        server.max_body_bytes,
        server.request_timeout_s,
        svc.responses,
        server.write_timeout_s,
    )


async def list_models(
    request: Request,
    limit: int | None = anthropic_routes.LIMIT,
    after_id: str | None = anthropic_routes.AFTER_ID,
    before_id: str | None = anthropic_routes.BEFORE_ID,
    beta: str | None = anthropic_routes.BETA,
) -> Response:
    access = services_of(request).access
    if VERSION_HEADER in request.headers:
        return await anthropic_routes.anthropic_models(
            request,
            access,
            limit=limit or anthropic_routes.DEFAULT_PAGE,
            after_id=after_id,
            before_id=before_id,
        )
    for name, value in (("limit", limit), ("after_id", after_id), ("before_id", before_id)):
        if value is not None:
            raise InvalidRequest(
                f"query parameter `{name}` pages Anthropic's model list only; send `{VERSION_HEADER}`",
                param=name,
            )
    identity = await authenticate(access, request.headers.get("authorization"), now=dt.datetime.now(dt.UTC))
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "switchboard"}
        for name in await access.allowed_models(identity)
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
    ledger = svc.ledger
    body = {
        "status": "ok" if db_ok and redis_ok is not False else "degraded",
        "database": "ok" if db_ok else "unreachable",
        "redis": "not configured" if redis_ok is None else ("ok" if redis_ok else "unreachable"),
        "ledger": {
            "queued": ledger.queued,
            "written": ledger.written,
            "spilled": ledger.spilled,
            "replayed": ledger.replayed,
            "rejected": ledger.rejected,
            "lost": ledger.lost,
            "db_down": ledger.db_down,
        },
    }
    return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type=JSON)


async def metrics(request: Request) -> Response:
    svc = services_of(request)
    server = svc.config.server
    if not server.metrics_public:
        token = os.environ.get(server.metrics_token_env) if server.metrics_token_env else None
        presented = bearer_token(request.headers.get("authorization"))
        if token is None or not hmac.compare_digest(presented.encode(), token.encode()):
            try:
                svc.access.authenticate_admin(presented)
            except AdminOnly:
                raise AdminOnly(
                    "/metrics needs the admin key or the metrics token (config: server.metrics_token_env, "
                    "or server.metrics_public = true)"
                ) from None
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4")


def add_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's own files served from the `swagger-ui-bundle` package: no CDN at run time."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Switchboard API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


def _query_fields(dependant: Dependant) -> Iterator[str]:
    yield from (field.alias for field in dependant.query_params)
    for sub in dependant.dependencies:
        yield from _query_fields(sub)


async def refuse_unknown_query(conn: HTTPConnection) -> None:
    """A query parameter the route does not take is a 400 naming it, never silently ignored: a typo such as
    `gruop_by=team` would otherwise answer an ungrouped report as if it were the one asked for."""
    route = conn.scope.get("route")
    if not conn.query_params or not isinstance(route, APIRoute):
        return
    known = frozenset(_query_fields(route.dependant))  # a few fields: cheaper than caching by route
    for name in conn.query_params:
        if name not in known:
            takes = ", ".join(sorted(known)) or "none"
            raise InvalidRequest(
                f"unknown query parameter `{name[:64]}`; {route.path} takes: {takes}", param=name[:64] or None
            )


def error_response(exc: SwitchboardError, request: Request | None = None) -> Response:
    """The OpenAI error envelope, for every route that is not a translator's; Anthropic's where it is
    wanted (its paths, or a request sending `anthropic-version`)."""
    if request is not None and anthropic_routes.wants_anthropic(request):
        return anthropic_routes.anthropic_error(exc)
    return enveloped_response(exc, error_body(exc))


def _install_error_handlers(app: FastAPI) -> None:
    async def on_switchboard(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SwitchboardError)
        return error_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # loc opens with where the value came from (body, query, path, header): the name is what follows.
        param = ".".join(str(p) for p in tuple(err.get("loc", ()))[1:]) or None
        what = f"`{param}`" if param else "the request"
        invalid = InvalidRequest(f"invalid value for {what}: {err.get('msg')}", param=param)
        return error_response(invalid, request)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(
                NotFound(f"no route {request.method} {request.url.path}; see /docs"), request
            )
        err = SwitchboardError(str(exc.detail))
        err.status_code = exc.status_code
        err.openai_type = "invalid_request_error"
        err.code = "method_not_allowed" if exc.status_code == 405 else "http_error"
        return error_response(err, request)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # The one top-level catch: log with the request id, answer with the envelope, never leak details.
        log.exception("unhandled error in request %s", timing_of(request.scope).request_id)
        return error_response(SwitchboardError("internal error; the gateway log has details"), request)

    app.add_exception_handler(SwitchboardError, on_switchboard)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


class SwitchboardApp(FastAPI):
    """FastAPI plus a fast lane for the translator endpoints (`add_translator`).

    FastAPI's per-request machinery (five middleware layers, routing, dependency solving) cost ~12% of the
    gateway's CPU at 2k req/s. The lane keeps the request-context middleware and the same error rendering.
    """

    def __init__(self, *, model_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lanes: dict[str, ASGIApp] = {}
        self._body_schemas: list[str] = []
        self._model_names = model_names  # examples of `model` in the published request bodies

    def add_translator(self, translator: Translator) -> None:
        """Serve `POST translator.path` through the shared pipeline."""

        async def lane(scope: Scope, receive: Receive, send: Send) -> None:
            await serve(translator, scope["app"].state.endpoint_deps, scope, receive, send)

        answer = ok(
            getattr(translator, "answer_model", None), "the answer; with `stream`, server-sent events"
        )
        answer[200]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
        codes = getattr(translator, "error_statuses", (400, 401, 403, 404, 413, 429, 502, 503, 504))
        statuses = errors(*codes, envelope=getattr(translator, "error_model", None))
        body_model = getattr(translator, "body_model", None)
        self.add_lane(translator.path, lane, translator.endpoint, body_model, {**answer, **statuses})

    def add_lane(
        self, path: str, handler: ASGIApp, name: str, body_model: type | None, responses: dict[int | str, Any]
    ) -> None:
        """Serve `POST path` with a raw ASGI `handler` on the fast lane (the request context is kept; the
        handler renders its own errors), documented by a placeholder route that only the OpenAPI listing
        sees, its body typed with `body_model` so that the document shows the real request schema."""

        async def documented(body: Any) -> Response:
            raise NotImplementedError

        self._lanes[path] = RequestContextMiddleware(handler)
        if body_model is not None:
            param = inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=body_model)
            documented.__signature__ = inspect.Signature([param])  # type: ignore[attr-defined]
            self._body_schemas.append(body_model.__name__)
        else:
            documented.__signature__ = inspect.Signature([])  # type: ignore[attr-defined]
        self.add_api_route(
            path, documented, methods=["POST"], name=name, tags=[TAG_TEAM], responses=responses
        )

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = finish(super().openapi())
            for name in self._body_schemas:
                model_examples(doc, name, self._model_names)
            self.openapi_schema = doc
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            lane = self._lanes.get(scope["path"])
            if lane is not None:
                scope["app"] = self
                await lane(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _add_plain_routes(app: FastAPI) -> None:
    models = {**ok(AnyModelList, "the models this key may use"), **errors(401, 503)}
    app.add_api_route("/v1/models", list_models, methods=["GET"], tags=[TAG_TEAM], responses=models)
    app.add_api_route(
        "/healthz", healthz, methods=["GET"], tags=[TAG_OPS], responses={**ok(Health, "alive"), **errors()}
    )
    ready = {
        **ok(Readiness, "ready"),
        **ok(Readiness, "not ready: no database, or no Redis when limits fail closed", status=503),
    }
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=[TAG_OPS], responses={**errors(), **ready})
    scrape = {**ok(None, "Prometheus text format", media="text/plain"), **errors(401, 403)}
    app.add_api_route("/metrics", metrics, methods=["GET"], tags=[TAG_OPS], responses=scrape)


def create_app(config: Config) -> SwitchboardApp:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = await build_services(config)
        app.state.services = svc
        app.state.endpoint_deps = endpoint_deps(svc)
        app.state.router_deps = RouterDeps.of(svc)
        # Everything built so far lives as long as the app: move it out of the collector's sight, so the
        # periodic full collections under load scan only per-request garbage (shorter pauses, lower p99).
        gc.freeze()
        try:
            yield
        finally:
            await svc.aclose()

    docs = config.server.docs
    # No slash redirects: they echo the client's Host header into Location (an open redirect); a wrong
    # path is a plain 404 in the OpenAI envelope.
    app = SwitchboardApp(
        title="Switchboard",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        model_names=tuple(config.models),
        dependencies=[Depends(refuse_unknown_query)],
    )
    if docs:
        add_docs(app)
    app.add_translator(ChatCompletions())
    app.add_translator(Completions())
    app.add_translator(Responses())
    app.add_translator(AnthropicMessages())
    counted = ok(CountAnswer, "the input tokens: the routed model's tokenizer, else an estimate")
    counted.update(errors(*anthropic_routes.COUNT_STATUSES, envelope=ErrorAnswer))
    app.add_lane(
        anthropic_routes.COUNT_PATH,
        anthropic_routes.count_tokens_lane,
        "messages.count_tokens",
        CountTokensBody,
        counted,
    )
    app.add_translator(Embeddings())
    _add_plain_routes(app)
    app.include_router(admin_router())
    app.include_router(usage_router())
    app.include_router(responses_router())  # GET/DELETE /v1/responses/{id}; the POST is a translator
    app.include_router(files_router())  # /v1/files: uploads streamed to file storage (files.*)
    app.include_router(batches_router())  # /v1/batches: state in SQL, items run by every replica's worker
    app.include_router(edge_router())  # /v1/edge/connect (WebSocket) and /admin/edge/...
    if config.console.enabled:
        install_console(app)  # /console: the admin web console (gateway/console/)
    _install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    return app
