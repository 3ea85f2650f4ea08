"""`GET`/`DELETE /v1/responses/{response_id}` and `GET .../input_items`: stored responses, read back.

Invariant: a key sees only its own team's responses; another team's id is a 404, exactly like an id that
never existed, so ids cannot be probed across teams. The `POST` is a translator
(gateway/translate/openai_responses.py) on the shared pipeline; these routes never reach a backend.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from gateway.errors import InvalidRequest, NotFound
from gateway.http.auth import authenticate
from gateway.http.deps import ResponseDeps, router_deps
from gateway.http.openapi import TAG_TEAM, errors, ok
from gateway.store.responses import StoredResponse
from gateway.translate.openai_responses import ResponseObject

JSON = "application/json"


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool


class InputItemList(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


async def _stored(request: Request, response_id: str) -> StoredResponse:
    deps: ResponseDeps = router_deps(request).responses
    now = dt.datetime.now(dt.UTC)
    identity = await authenticate(deps.access, request.headers.get("authorization"), now=now)
    found = None
    if len(response_id) <= 64:
        found = await deps.store.load(response_id, identity.team, now=now)
    if found is None:
        raise _not_found(response_id)
    return found


def _not_found(response_id: str) -> NotFound:
    shown = f"`{response_id}`" if len(response_id) <= 64 else "with that id"
    return NotFound(
        f"no stored response {shown} for this key's team: it was never stored (store=false), was deleted, "
        "or is older than the retention (config: responses.retention_days)",
        param="response_id",
    )


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type=JSON)


def _page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> dict[str, Any]:
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise InvalidRequest("`after` names no input item of this response", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }


def responses_router() -> APIRouter:
    router = APIRouter()
    found = errors(401, 404, 503)

    @router.get(
        "/v1/responses/{response_id}",
        tags=[TAG_TEAM],
        responses={**ok(ResponseObject, "the stored response"), **found},
    )
    async def get_response(request: Request, response_id: str) -> Response:
        return _json((await _stored(request, response_id)).response)

    @router.delete(
        "/v1/responses/{response_id}",
        tags=[TAG_TEAM],
        responses={**ok(DeletedResponse, "deleted"), **found},
    )
    async def delete_response(request: Request, response_id: str) -> Response:
        deps: ResponseDeps = router_deps(request).responses
        now = dt.datetime.now(dt.UTC)
        identity = await authenticate(deps.access, request.headers.get("authorization"), now=now)
        if len(response_id) > 64 or not await deps.store.delete(response_id, identity.team, now=now):
            raise _not_found(response_id)
        return _json({"id": response_id, "object": "response", "deleted": True})

    @router.get(
        "/v1/responses/{response_id}/input_items",
        tags=[TAG_TEAM],
        responses={**ok(InputItemList, "the response's input items"), **found},
    )
    async def list_input_items(
        request: Request,
        response_id: str,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        after: Annotated[str | None, Query(max_length=128)] = None,
    ) -> Response:
        stored = await _stored(request, response_id)
        return _json(_page(list(map(dict, stored.input_items)), limit, order, after))

    return router
