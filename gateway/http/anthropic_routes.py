"""Anthropic's routes beside `POST /v1/messages` (a translator, gateway/translate/anthropic_messages.py):
token counting, the model list in Anthropic's format, and Anthropic's error envelope for them.

`count_tokens` is planned like a request (key, model, privacy floor, routing) but served by no pipeline: it
writes no ledger row and takes nothing from rate limits or budgets. The top-ranked deployment's backend counts
with the model's own tokenizer when it can (vLLM's `/tokenize`, our engine: `pipeline.token_count`); otherwise
the count is the gateway's estimate (about four characters a token, `anthropic_render.estimate_input_tokens`).
The `x-switchboard-token-count` header says which (`tokenizer` or `estimate`).
"""

from __future__ import annotations

import datetime as dt
import logging

from fastapi import Query
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backends.errors import SwitchboardError
from gateway.http.auth import presented_key
from gateway.http.context import timing_of
from gateway.http.endpoints import enveloped_response, read_body
from gateway.pipeline.access import ModelAccess
from gateway.pipeline.request import GatewayRequest, Hints
from gateway.pipeline.token_count import count_prompt_tokens
from gateway.records import KeyIdentity
from gateway.translate import anthropic_render as render
from gateway.translate.anthropic_count import COUNT_HEADER, count_request, render_count
from gateway.translate.anthropic_headers import FORWARDED, VERSION_HEADER, checked_version
from gateway.translate.anthropic_messages import AnthropicMessages, CountTokensBody, parse_conversation

JSON = "application/json"
API_KEY_HEADER = AnthropicMessages.api_key_header
COUNT_STATUSES = (400, 401, 403, 404, 413, 500)
DEFAULT_PAGE = 20
COUNT_PATH = "/v1/messages/count_tokens"
BACKEND_HEADER = "x-switchboard-backend"  # whose tokenizer counted, as served requests name their backend
log = logging.getLogger("switchboard")


def wants_anthropic(request: Request) -> bool:
    """Errors of Anthropic's paths, and of any request sending `anthropic-version`, use its envelope."""
    return request.url.path.startswith("/v1/messages") or VERSION_HEADER in request.headers


def anthropic_error(exc: SwitchboardError) -> Response:
    return enveloped_response(exc, render.error_body(exc), render.error_status(exc))


async def _identity(access: ModelAccess, request: Request) -> KeyIdentity:
    checked_version(request.headers.get(VERSION_HEADER))
    key = presented_key(request.headers, API_KEY_HEADER)
    return await access.authenticate(key, now=dt.datetime.now(dt.UTC))


async def count_tokens(request: Request) -> Response:
    """`POST /v1/messages/count_tokens`: `{"input_tokens": N}` for a Messages body (no `max_tokens`)."""
    svc = request.app.state.services
    received_at = dt.datetime.now(dt.UTC)
    identity = await _identity(svc.access, request)
    conv = parse_conversation(await read_body(request, svc.config.server.max_body_bytes), CountTokensBody)
    request_id = timing_of(request.scope).request_id
    forwarded = tuple((n, v) for n in FORWARDED if (v := request.headers.get(n)))
    call = count_request(conv, request_id, svc.config.server.request_timeout_s, forwarded)
    greq = GatewayRequest(
        endpoint="messages.count_tokens",
        call=call,
        identity=identity,
        received_at=received_at,
        hints=Hints.from_headers(request.headers),
    )
    pipeline = svc.pipeline
    counted = await count_prompt_tokens(
        pipeline.planner, pipeline.dispatcher.backends, greq, now_s=pipeline.clock.now_s()
    )
    if counted is None:
        estimate = render.estimate_input_tokens(conv.messages, conv.tools)
        return Response(render_count(estimate), media_type=JSON, headers={COUNT_HEADER: "estimate"})
    headers = {COUNT_HEADER: "tokenizer", BACKEND_HEADER: counted.backend}
    return Response(render_count(counted.input_tokens), media_type=JSON, headers=headers)


async def count_tokens_lane(scope: Scope, receive: Receive, send: Send) -> None:
    """The fast-lane handler (no FastAPI routing: the SDK's `?beta=true` and Anthropic's errors pass)."""
    try:
        response = await count_tokens(Request(scope, receive))
    except SwitchboardError as exc:
        response = anthropic_error(exc)
    except Exception:  # noqa: BLE001 - the top-level handler of this lane
        log.exception("unhandled error in request %s", timing_of(scope).request_id)
        response = anthropic_error(SwitchboardError("internal error; the gateway log has details"))
    await response(scope, receive, send)


async def anthropic_models(
    request: Request, access: ModelAccess, *, limit: int, after_id: str | None, before_id: str | None
) -> Response:
    identity = await _identity(access, request)
    names = await access.allowed_models(identity)
    page = render.render_models(
        names, dt.datetime.now(dt.UTC), limit=limit, after_id=after_id, before_id=before_id
    )
    return Response(page, media_type=JSON)


# Query parameters of `GET /v1/models`: Anthropic's paging (and the SDK's `beta=true`), typed for the docs.
LIMIT = Query(None, ge=1, le=1000, description="Anthropic format only: models per page (default 20)")
AFTER_ID = Query(None, max_length=256, description="Anthropic format only: the page after this model")
BEFORE_ID = Query(None, max_length=256, description="Anthropic format only: the page before this model")
BETA = Query(None, max_length=16, description="sent by Anthropic's beta clients; ignored")
