"""`/v1/batches`: create, retrieve, list and cancel a team's batches (OpenAI's Batch API).

Invariants: a key sees only its own team's batches, and may only name its own team's input file: another
team's id is a 404, exactly like one that never existed. These routes run no request themselves, so they
leave no ledger row; each item the worker runs leaves its own (gateway/batch/).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from gateway.batch.service import BatchService
from gateway.errors import InvalidRequest
from gateway.http.auth import authenticate
from gateway.http.deps import BatchDeps, router_deps
from gateway.http.endpoints import read_body
from gateway.http.openapi import TAG_TEAM, errors, ok
from gateway.records import KeyIdentity

JSON = "application/json"
MAX_BODY_BYTES = 64 << 10


class BatchObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    endpoint: str
    status: str
    input_file_id: str
    completion_window: str
    created_at: int
    request_counts: dict[str, int]


class BatchList(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: str
    data: list[BatchObject]
    has_more: bool


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type=JSON)


async def _caller(request: Request) -> tuple[BatchService, KeyIdentity, dt.datetime]:
    deps: BatchDeps = router_deps(request).batches
    now = dt.datetime.now(dt.UTC)
    identity = await authenticate(deps.access, request.headers.get("authorization"), now=now)
    return deps.batches, identity, now


def batches_router() -> APIRouter:
    router = APIRouter()
    found = errors(401, 404, 503)
    one = ok(BatchObject, "the batch")

    @router.post(
        "/v1/batches",
        tags=[TAG_TEAM],
        responses={**one, **errors(400, 401, 404, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": BatchCreate.model_json_schema()}},
            }
        },
    )
    async def create_batch(request: Request) -> Response:
        batches, identity, now = await _caller(request)
        try:
            body = orjson.loads(await read_body(request, MAX_BODY_BYTES))
        except orjson.JSONDecodeError:
            raise InvalidRequest("the request body must be a JSON object") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return _json(await batches.create(body, identity, now))

    @router.get("/v1/batches", tags=[TAG_TEAM], responses={**ok(BatchList, "the team's batches"), **found})
    async def list_batches(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(max_length=128)] = None,
    ) -> Response:
        batches, identity, _ = await _caller(request)
        return _json(await batches.page(identity.team, limit=limit, after=after))

    @router.get("/v1/batches/{batch_id}", tags=[TAG_TEAM], responses={**one, **found})
    async def retrieve_batch(request: Request, batch_id: str) -> Response:
        batches, identity, _ = await _caller(request)
        return _json(await batches.get(batch_id, identity.team))

    @router.post("/v1/batches/{batch_id}/cancel", tags=[TAG_TEAM], responses={**one, **found})
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        batches, identity, now = await _caller(request)
        return _json(await batches.cancel(batch_id, identity.team, now))

    return router
